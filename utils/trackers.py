"""Experiment trackers (``--report_to none|tensorboard|wandb``) on accelerate's tracker interface.

One ``Trackers`` object per run: the entry point opens it (``open_trackers(cfg)``) and passes it
to ``utils.training.train``, which hands ``accelerator_kwargs()`` (``log_with``, ``project_dir``)
to the ``Accelerator`` it builds, starts the trackers on it (``accelerator.init_trackers``) and
logs every recorded step (``cfg.log_every``: the same entries as ``TrainStats.losses``); after
evaluation the entry point logs the metrics and closes it (``finish``). Only the main process
logs; with ``report_to == "none"`` every method is a no-op and nothing is written.

Keys: ``train/loss``, ``train/lr`` (the learning rate the step used), ``loss_terms/<term>`` (each
term the loss function returns, e.g. SPUL's ``L_f``, ``L_r``, ``L_kl``), all at the optimiser
step; ``eval/<split>/<metric>`` (accuracy, f1, ... and ``predictions/<kind>``) at the last step.

Where: the run folder is written atomically once the run is over, so the logs go to the tracker
folder, by default the sibling ``<output_path>.trackers/`` (kept after the run, next to it):

- tensorboard: ``<tracker_dir>/<run_name>/events.out.tfevents.*`` (hyper-parameters in a
  timestamped subfolder); open with ``tensorboard --logdir <tracker_dir>``.
- wandb: always local unless the user set ``WANDB_MODE`` (``offline`` is forced otherwise, so no
  account or network is needed): ``<tracker_dir>/wandb/offline-run-<time>-<id>/``; upload later
  with ``wandb sync <that folder>``.

``run_name`` defaults to ``<run folder name>-<YYYYmmdd-HHMMSS>``, so reruns (``--overwrite``,
``--resume``) land in their own tensorboard folder / wandb run instead of mixing steps.

accelerate's ``end_training`` is not called: besides finishing the trackers it destroys the
process group, which the entry points still need for their final barrier; ``close`` finishes
each tracker instead.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import math
import os
import tempfile
from pathlib import Path

from utils import distributed


class TrackerError(ValueError):
    """A bad tracking flag (``--report_to``, ``--tracker_dir``); one line naming it."""


REPORT_TO = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": ("tensorboard", "2.21.0"), "wandb": ("wandb", "0.31.0")}  # requirements.txt
DEFAULT_PROJECT = "spul"
TRACKER_FLAGS = ("report_to", "tracker_dir", "tracker_project", "run_name")  # logging only: not part of a run's fingerprint


def default_tracker_dir(out) -> Path:
    """The visible sibling of the run folder: ``<output_path>.trackers``."""
    out = Path(out)
    return out.parent / f"{out.name}.trackers"


def check_package(report_to: str) -> None:
    """The tracker's package must be importable (before any model is loaded)."""
    if report_to in (None, "none"):
        return
    if report_to not in PACKAGES:
        raise TrackerError(f"--report_to {report_to}: choose from {', '.join(REPORT_TO)}")
    module, version = PACKAGES[report_to]
    if importlib.util.find_spec(module) is None:
        raise TrackerError(f"--report_to {report_to}: the {module} package is not installed "
                         f"(pip install {module}=={version})")


def check_tracker_dir(path) -> Path:
    """Create the tracker folder and check that a file can be written in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise TrackerError(f"--tracker_dir {path}: not writable ({e.strerror or e})") from e
    return path


def hparams(config: dict) -> dict:
    """Flags as tracker hyper-parameters: bool/int/float/str kept, anything else as JSON text."""
    out = {}
    for k, v in config.items():
        out[k] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)
    return out


def flatten_metrics(metrics: dict, prefix: str = "eval") -> dict:
    """``{split: {"accuracy": .., "predictions": {"generic": ..}}}`` -> ``{"eval/split/accuracy": ..,
    "eval/split/predictions/generic": ..}``: numeric leaves only (no bools, no NaN)."""
    out = {}
    for k, v in metrics.items():
        key = f"{prefix}/{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v) if isinstance(v, float) else int(v)
    return out


def step_values(loss: float, terms: dict, lr: float) -> dict:
    """What one recorded optimiser step logs."""
    values = {"train/loss": float(loss), "train/lr": float(lr)}
    values.update({f"loss_terms/{k}": float(v) for k, v in terms.items() if isinstance(v, (int, float))})
    return values


class Trackers:
    """The run's trackers; a no-op with ``report_to == "none"`` and on every process but the main one."""

    def __init__(self, cfg):
        self.report_to = getattr(cfg, "report_to", "none") or "none"
        self.tracker_dir = getattr(cfg, "tracker_dir", None)
        self.project = getattr(cfg, "tracker_project", None) or DEFAULT_PROJECT
        self.run_name = getattr(cfg, "run_name", None) or "run"
        self.config = getattr(cfg, "tracker_config", None)
        self.active = self.report_to != "none" and distributed.is_main()
        if self.active and not self.tracker_dir:
            raise ValueError(f"report_to={self.report_to}: needs a tracker_dir")
        self.accelerator = None
        self.closed = False

    def accelerator_kwargs(self) -> dict:
        """``Accelerator(**...)`` arguments: the tracker and the folder its logs go to."""
        if not self.active:
            return {}
        return {"log_with": self.report_to, "project_dir": str(self.tracker_dir)}

    def start(self, accelerator) -> None:
        """``accelerator.init_trackers`` on the first ``Accelerator`` built with ``accelerator_kwargs``."""
        if not self.active or self.accelerator is not None or self.closed:
            return
        init_kwargs = {}
        if self.report_to == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")  # no account, no network, unless the user asks
            init_kwargs = {"wandb": {"name": self.run_name, "dir": str(self.tracker_dir)}}
            project = self.project
        else:  # tensorboard: <tracker_dir>/<run_name>/
            project = self.run_name
        accelerator.init_trackers(project, config=self.config, init_kwargs=init_kwargs)
        self.accelerator = accelerator
        atexit.register(self.close)  # a crash or sys.exit still flushes and closes the run

    def log(self, values: dict, step: int) -> None:
        if self.active and self.accelerator is not None and not self.closed and values:
            self.accelerator.log(values, step=step)

    def log_step(self, step: int, loss: float, terms: dict, lr: float) -> None:
        self.log(step_values(loss, terms, lr), step)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Evaluation metrics (``Evaluation.metrics``) at ``step`` (the last optimiser step)."""
        self.log(flatten_metrics(metrics), step)

    def close(self) -> None:
        """Finish every tracker (idempotent)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []

    def finish(self, metrics: dict | None = None, step: int | None = None) -> None:
        """Log the evaluation metrics (if any) and close."""
        if metrics is not None and step is not None:
            self.log_metrics(metrics, step)
        self.close()


def open_trackers(cfg) -> Trackers:
    return Trackers(cfg)
