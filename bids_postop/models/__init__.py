"""Published models: catalogue, download, checksum and the local cache (see :mod:`bids_postop.models.registry`)."""

from bids_postop.models.registry import (
    BUNDLED_CATALOGUE,
    CATALOGUE_URL,
    HOME_ENV,
    CatalogueEntry,
    DownloadError,
    fetch,
    import_model,
    installed_models,
    model_info,
    models_home,
    read_catalogue,
    resolve_installed,
)

__all__ = [
    "BUNDLED_CATALOGUE",
    "CATALOGUE_URL",
    "HOME_ENV",
    "CatalogueEntry",
    "DownloadError",
    "fetch",
    "import_model",
    "installed_models",
    "model_info",
    "models_home",
    "read_catalogue",
    "resolve_installed",
]
