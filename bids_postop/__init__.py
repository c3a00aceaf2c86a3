"""bids_postop: residual glioblastoma after surgery, from early post-operative MRI, as a BIDS app."""

__version__ = "0.1.0"
