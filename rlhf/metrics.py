"""Training metrics: one jsonl file, an optional wandb run, and a progress bar.

Every trainer builds one ``MetricsLogger`` on every rank, with ``enabled`` true on rank 0 only,
so trainer code never branches on the rank to log. The jsonl file is the record of truth: it
needs no account or network, lives next to the exported model (``KEEP_ON_EXPORT``) and is what
``plot_metrics`` draws. wandb is an extra sink; ``WANDB_MODE=offline`` (wandb's own variable)
writes the run under ``<metrics folder>/wandb/`` for a later ``wandb sync``.

The progress bar shows the metrics named by ``bar_keys`` that a record has (by default loss,
reward, KL, response length, lr and tokens/s: a trainer shows those it logs); every metric is
written to the file and to wandb.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from rlhf.config import LoggingConfig
from rlhf.errors import UserError

RESERVED_KEYS = ("step", "time")

# metric name -> (label on the progress bar, formatter); other metrics show as name=%.4g
_BAR_FORMATS = {
    "loss": ("loss", lambda v: f"{v:.4g}"),
    "reward": ("reward", lambda v: f"{v:.3g}"),
    "kl": ("kl", lambda v: f"{v:.3g}"),
    "response_length": ("len", lambda v: f"{v:.1f}"),
    "eval_reward": ("eval", lambda v: f"{v:.3g}"),
    "entropy": ("ent", lambda v: f"{v:.3g}"),
    "lr": ("lr", lambda v: f"{v:.2e}"),
    "tokens_per_s": ("tok/s", lambda v: _si(v)),
}
DEFAULT_BAR_KEYS = ("loss", "reward", "kl", "response_length", "lr", "tokens_per_s")


def seconds_since_process_start() -> float:
    """Wall seconds since this process was created (the OS's record, so imports count too)."""
    import psutil  # a DeepSpeed dependency

    return time.time() - psutil.Process().create_time()


def bar_text(values: Mapping[str, Any], keys: Sequence[str]) -> str:
    """'reward=0.5 kl=0.012 len=7.0 lr=1.00e-05': the ``keys`` that ``values`` has, in that order."""
    parts = []
    for key in keys:
        if _is_number(values.get(key)):
            label, fmt = _BAR_FORMATS.get(key, (key, lambda v: f"{v:.4g}"))
            parts.append(f"{label}={fmt(values[key])}")
    return " ".join(parts)


def _si(value: float) -> str:
    """1234.5 -> '1.2k': throughput numbers only need two significant figures on a bar."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.1f}{suffix}"
    return f"{value:.0f}"


def _plain(value: Any) -> Any:
    """Tensors / numpy scalars -> Python numbers, so json and wandb see plain values."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


class MetricsLogger:
    """Appends ``{"step", **metrics, "time"}`` lines to a jsonl file, mirrors them to wandb, and
    drives a tqdm bar. With ``enabled=False`` (ranks other than 0) every method does nothing.

    Args:
        path: metrics jsonl file. A fresh run starts it anew (an old run's file in the same
            --save_path would otherwise mix two runs in the printed curve and the plot); a
            resumed run (``resumed``) appends, continuing the same file.
        cfg: the ``--logging_*`` / ``--use_wandb`` / ``--wandb_*`` options.
        run_config: the full run configuration (e.g. ``dataclasses.asdict(cfg)``), recorded as
            the wandb run config.
        trainer: trainer name (``"sft"``, ``"dpo"`` ...): bar label and default wandb run name.
        total_steps: optimizer steps of the whole run, the bar's total.
        enabled: false on every rank but 0.
        resumed: the run continues from a checkpoint: append instead of starting the file anew.
        bar_keys: the metrics shown on the progress bar, in order, when a record has them.
    """

    def __init__(
        self,
        path: str,
        cfg: LoggingConfig,
        run_config: Mapping[str, Any],
        trainer: str,
        total_steps: int,
        enabled: bool = True,
        resumed: bool = False,
        bar_keys: Sequence[str] = DEFAULT_BAR_KEYS,
    ) -> None:
        self.bar_keys = tuple(bar_keys)
        self.path = path
        self.enabled = enabled
        self._file = None
        self._bar = None
        self._wandb_run = None
        if not enabled:
            return
        file = Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        if cfg.use_wandb:  # first: if it fails, nothing else has been opened
            self._wandb_run = _start_wandb(cfg, dict(run_config), trainer, str(file.parent))
        if resumed:
            _drop_torn_tail(file)
        # Line-buffered text: each record reaches the OS as one write as soon as it is logged,
        # so a crash loses at most the line being written and `tail -f` shows progress live.
        self._file = open(file, "a" if resumed else "w", encoding="utf-8", buffering=1)
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, desc=trainer, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` for optimizer step ``step`` (file, wandb, progress bar)."""
        if not self.enabled or self._file is None:
            return
        clash = [k for k in RESERVED_KEYS if k in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved by the metrics file")
        values = {k: _plain(v) for k, v in metrics.items()}
        record = {"step": int(step), **values, "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=int(step))
        if self._bar is not None:
            # Jump to `step` rather than +1: logging may be every N steps and may start at a
            # resumed step.
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            postfix = bar_text(values, self.bar_keys)
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=True)

    def close(self) -> None:
        """Finish the wandb run (writes the offline run files) and close the bar and the file."""
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            run.finish()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _drop_torn_tail(file: Path) -> None:
    """Cut an unterminated last line left by a killed run, so appended records stay parseable."""
    if not file.is_file() or file.stat().st_size == 0:
        return
    with open(file, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)  # rfind -1 -> truncate(0): the file was one torn line


def _start_wandb(cfg: LoggingConfig, run_config: dict, trainer: str, folder: str) -> Any:
    import wandb

    name = cfg.wandb_run_name or f"{trainer}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        return wandb.init(
            project=cfg.wandb_project,
            entity=cfg.wandb_org,
            name=name,
            config=run_config,
            # The user's WANDB_DIR wins; otherwise the run lives beside the metrics file.
            dir=os.environ.get("WANDB_DIR") or folder,
        )
    except Exception as err:  # no API key, unreachable server, bad entity ...
        message = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"--use_wandb: wandb.init failed: {message} (run `wandb login`, or set WANDB_MODE=offline)") from None


# ----------------------------------------------------------------------------------------------
# Reading and plotting


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics jsonl file, in file order."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: no such metrics file")
    records = []
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or "step" not in record:
                raise UserError(f"{path}:{lineno}: not a metrics record (a JSON object with a 'step')")
            records.append(record)
    return records


def metric_series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, sorted by step.

    A resumed run re-logs the steps after its last checkpoint; the later record of a step wins,
    so the curve shows the run that actually produced the final model.
    """
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def run_title(path: str, title: Optional[str] = None) -> str:
    """A plot's title: ``title``, else the folder of the metrics file as given (the run's
    --save_path), absolute when the file sits in the working directory."""
    if title:
        return title
    folder = Path(path).parent
    return str(folder if str(folder) != "." else folder.resolve())


def plot_metrics(path: str, keys: Sequence[str], out_png: str, title: Optional[str] = None) -> str:
    """Draw each metric in ``keys`` against the step (one panel per metric) into ``out_png``.

    The title names the run: ``title`` (e.g. the wandb run name), else the folder holding the
    metrics file, which is the run's --save_path.

    Uses matplotlib's Agg canvas directly, never pyplot, so it works without a display and does
    not change the process-wide backend of a caller that has one. Returns ``out_png``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not keys:
        raise ValueError("plot_metrics needs at least one metric name")
    records = read_metrics(path)
    series = {key: metric_series(records, key) for key in keys}
    missing = [key for key, (steps, _) in series.items() if not steps]
    if missing:
        available = sorted({k for r in records for k in r} - set(RESERVED_KEYS))
        raise UserError(f"{path}: no values for metric(s) {', '.join(missing)} (available: {', '.join(available) or 'none'})")

    fig = Figure(figsize=(7, 2.6 * len(keys)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        steps, values = series[key]
        ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, linewidth=1.5)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].set_title(run_title(path, title))

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Temp name + rename: a reader (or an export copying *.png) never sees a half-written image.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, out)
    return str(out)
