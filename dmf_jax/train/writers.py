"""Where training reports go: JSON lines, TensorBoard events, the terminal, a PNG of the curves.

Only process 0 writes files. `metrics.jsonl` has one record per report:
{"step": int, "kind": "train" | "eval", ...values}. TensorBoard events go through tensorboardX
(no TensorFlow). On a terminal, a live progress line shows steps, examples/s, loss and ETA; in a
log file (not a tty) plain lines are printed every report instead.
"""

from __future__ import annotations

import json
import sys
import time

from etils import epath

from dmf_jax.core import jsonio


class MetricWriter:
  """Appends reports to metrics.jsonl and TensorBoard. A run that resumed from a checkpoint at
  `start_step` first drops what the interrupted run reported after that step (it is done
  again), so that the curves never loop back: metrics.jsonl keeps the records up to
  `start_step`, and TensorBoard purges the later events (`purge_step`)."""

  def __init__(self, workdir: epath.PathLike, *, enabled: bool = True, tensorboard: bool = True,
               start_step: int = 0):
    self.workdir = epath.Path(workdir)
    self.enabled = enabled
    self._tb = None
    if enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      records = read_metrics(self.workdir)
      kept = [r for r in records if r["step"] <= start_step]
      if len(kept) < len(records):
        tmp = self.workdir / ".metrics.jsonl.tmp"
        tmp.write_text("".join(jsonio.dumps(r) + "\n" for r in kept))
        tmp.replace(self.workdir / "metrics.jsonl")
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        self._tb = SummaryWriter(str(self.workdir / "tensorboard"),
                                 purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, kind: str, values: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, **{k: _plain(v) for k, v in values.items()}}
    with (self.workdir / "metrics.jsonl").open("a") as f:
      f.write(jsonio.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in values.items():
        if isinstance(value, (int, float)):
          self._tb.add_scalar(f"{kind}/{key}", value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _plain(value):
  try:
    return float(value)
  except (TypeError, ValueError):
    return value


def read_metrics(workdir: epath.PathLike) -> list[dict]:
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
  """A live progress line on a terminal; periodic plain lines otherwise.

  It shows two throughputs, labelled as in metrics.jsonl: `train` examples/s over the training
  steps only (`examples_per_s`: evaluations, saves and compilation excluded) and `wall`
  examples/s since the run (or resume) started, everything included (`wall_examples_per_s`).
  """

  def __init__(self, total_steps: int, start_step: int, batch_size: int, enabled: bool = True,
               stream=None):
    self.total = total_steps
    self.batch_size = batch_size
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
    self._t0, self._s0 = time.time(), start_step

  def rate(self, step: int) -> tuple[float, float]:
    """(steps/s, examples/s) since the start of this run, wall clock (evaluations included)."""
    elapsed = max(time.time() - self._t0, 1e-9)
    steps_per_s = (step - self._s0) / elapsed
    return steps_per_s, steps_per_s * self.batch_size

  def update(self, step: int, loss: float, train_examples_per_s: float | None = None) -> None:
    if not self.enabled:
      return
    steps_per_s, ex_per_s = self.rate(step)
    train = "" if train_examples_per_s is None else f"train {train_examples_per_s:,.0f} / "
    eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
    done = step / max(self.total, 1)
    if self.live:
      bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
      self.stream.write(f"\r[{bar}] {step}/{self.total} {train}wall {ex_per_s:,.0f} ex/s "
                        f"loss {loss:.4f} ETA {eta:,.0f}s ")
    else:
      self.stream.write(f"step {step}/{self.total} ({100 * done:.0f}%) {train}wall "
                        f"{ex_per_s:,.0f} ex/s loss {loss:.4f} ETA {eta:,.0f}s\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    if self.enabled:
      self.stream.write(("\n" if self.live else "") + text + "\n")
      self.stream.flush()


def plot_curves(workdir: epath.PathLike, title: str = "") -> epath.Path | None:
  """curves.png: training loss and validation AUC by step (from metrics.jsonl), titled
  `title` (e.g. 'dmf on generated_ctr/default')."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = read_metrics(workdir)
  train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train" and "loss" in r]
  evals = [(r["step"], r["val_auc"]) for r in records if r["kind"] == "eval" and "val_auc" in r]
  if not train and not evals:
    return None
  fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 3.8))
  if train:
    ax_loss.plot(*zip(*train), lw=1)
  ax_loss.set(xlabel="step", ylabel="training loss", title="Loss")
  if evals:
    ax_auc.plot(*zip(*evals), marker="o")
  ax_auc.set(xlabel="step", ylabel="validation AUC", title="Validation AUC")
  for ax in (ax_loss, ax_auc):
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path = epath.Path(workdir) / "curves.png"
  fig.savefig(str(path), dpi=110)
  plt.close(fig)
  return path
