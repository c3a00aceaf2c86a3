"""One tiny training of the study's protocol, shared by the slow tests of test_training.py, test_agunet.py and
test_protocol.py (training runs take minutes on 2 cores: made once per test session, never repeated).

Two architectures × two configurations on the simulated three-hospital set (conftest.write_three_site_demo):
``bids_postop-train --config A B`` with nnU-Net, then with AGU-Net, in one WORK_DIR, two hospital folds
(north, south) and the held-out test hospital east. The second run ends with the group level over all four
models (WORK_DIR/validation).
"""

from __future__ import annotations

import time
from pathlib import Path

_RUN: dict = {}


def argv(bids: Path, work: Path, architecture: str) -> list[str]:
    common = [str(bids), str(work), "--manual", f"manual={bids / 'derivatives' / 'manual'}", "--config", "A", "B",
              "--tiny", "--folds", "2", "--test-site", "east", "--skip-bids-validation", "--device", "cpu",
              "--nprocs", "1"]
    if architecture == "nnunet":
        return [*common, "--epochs", "1", "--iterations", "3", "--no-paper-tables"]
    return [*common, "--architecture", "agunet", "--epochs", "2", "--iterations", "1", "--effective-batch-size", "2"]


def trained(tmp_path_factory) -> dict:
    """The shared run: {"bids", "work", "argv": {architecture: argv}, "codes", "seconds"} (trained on first use)."""
    if _RUN:
        return _RUN
    from conftest import write_three_site_demo

    from bids_postop.cli.train import main as train_main

    root = tmp_path_factory.mktemp("trained_protocol")
    bids, work = root / "bids", root / "train"
    write_three_site_demo(bids)
    codes, seconds = {}, {}
    for architecture in ("nnunet", "agunet"):
        start = time.monotonic()
        codes[architecture] = train_main(argv(bids, work, architecture))
        seconds[architecture] = time.monotonic() - start
    print(f"shared tiny training (2 architectures x 2 configurations, 2 folds, test site): "
          f"{', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}")
    _RUN.update({"bids": bids, "work": work, "argv": {a: argv(bids, work, a) for a in codes}, "codes": codes,
                 "seconds": seconds})
    return _RUN
