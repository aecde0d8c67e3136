"""Fair comparisons: every (model, seed) trained with one config, selected on validation only.

A model spec is a registered name, optionally with the modalities it may use:
`dmf`, `dmf[text]`, `simtier[text+image]`. Each run trains in `DIR/runs/<name>/seed_<s>/`
(`dmf--text` for `dmf[text]`; `loop.train_and_evaluate`, which resumes a half-finished
run). A run whose `results.json` exists is not redone; its recorded identity (the config and
the dataset build, `runs.check_finished`) must be that of the run asked for, else the
ablation stops with `runs.RunMismatchError`; its best checkpoint must pass its content check,
else it is run again (which moves the damaged step aside and repairs the run). `train=False` trains nothing: it summarizes the
runs finished so far (e.g. by invocations with different --first_seed). With
`missing_fractions`, each run's best checkpoint is also evaluated with each modality missing
for those fractions of the items (`robustness`; cached in the run's robustness.json). After
every run the summary files are rewritten:

  DIR/results.json  one record per (model, seed): RECORD_KEYS (+ 'missing': modality ->
                    fraction -> test AUC)
  DIR/results.md    mean +- std per model (sorted by test AUC), gains over the baseline model;
                    the robustness table (test AUC per missing modality and fraction)
  DIR/results.png   test AUC per model, error bars one std over seeds
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from dmf_jax.core import jsonio
from dmf_jax.core.errors import ConfigError
from dmf_jax.train import config as config_lib
from dmf_jax.train import loop
from dmf_jax.train import restore
from dmf_jax.train import robustness
from dmf_jax.train import runs
from dmf_jax.train.checkpointing import CorruptCheckpointError

RECORD_KEYS = ("model", "seed", "val_auc", "test_auc", "test_gauc", "test_logloss",
               "cold_test_auc", "train_seconds", "params")
_SPEC = re.compile(r"^([A-Za-z0-9_]+)(?:\[([A-Za-z0-9_+]+)\])?$")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered model name and the modalities it uses (empty: all of the dataset's)."""

  name: str
  modalities: tuple[str, ...] = ()

  @classmethod
  def parse(cls, text: str) -> "ModelSpec":
    match = _SPEC.match(text.strip())
    if not match:
      raise ValueError(f"bad model spec {text!r}: expected NAME or NAME[mod1+mod2]")
    name, mods = match.groups()
    return cls(name, tuple(mods.split("+")) if mods else ())

  @property
  def label(self) -> str:
    return f"{self.name}[{'+'.join(self.modalities)}]" if self.modalities else self.name

  @property
  def dirname(self) -> str:
    """The label without brackets (tensorstore paths treat them specially): dmf--text-image."""
    return f"{self.name}--{'-'.join(self.modalities)}" if self.modalities else self.name


def run_config(base: ml_collections.ConfigDict, spec: ModelSpec, seed: int
               ) -> ml_collections.ConfigDict:
  """The base config with the spec's model and modalities and the seed."""
  config = copy.deepcopy(base)
  with config.unlocked():
    config.model = spec.name
  config = config_lib.with_model_values(config)
  with config.unlocked():
    config.model_config.modalities = spec.modalities
    config.seed = seed
  return config


def record_from_results(spec: ModelSpec, seed: int, results: dict) -> dict:
  cold = results["test"].get("cold")
  return {
      "model": spec.label,
      "seed": seed,
      "val_auc": results["validation"]["auc"],
      "test_auc": results["test"]["auc"],
      "test_gauc": results["test"]["gauc"],
      "test_logloss": results["test"]["logloss"],
      "cold_test_auc": cold["auc"] if cold else None,
      "train_seconds": results["train_seconds"],
      "params": results["params"],
      "best_step": results["best_step"],
      "steps": results["steps"],
  }


def run_ablation(
    base: ml_collections.ConfigDict,
    specs: Sequence[ModelSpec],
    seeds: Sequence[int],
    output_dir: epath.PathLike,
    *,
    baseline: str = "din",
    missing_fractions: Sequence[float] = (),
    train: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
  """Trains what is missing (unless `train` is False: then an unfinished run is left out),
  then returns (and writes) every record; see the module docstring."""
  output_dir = epath.Path(output_dir).expanduser()
  labels = [s.label for s in specs]
  if len(set(labels)) != len(labels):
    raise ConfigError(f"duplicate model specs in {labels}")
  if baseline not in labels:
    raise ConfigError(f"baseline {baseline!r} is not one of the models {labels}: the gains are "
                      f"measured against a model of the ablation (add it to --models, or pass "
                      f"--baseline=<one of them>)")
  for spec in specs:  # every config is checked before anything trains
    config_lib.validate(run_config(base, spec, seeds[0]), num_devices=jax.device_count(),
                        num_processes=jax.process_count())
  output_dir.mkdir(parents=True, exist_ok=True)
  records, dataset = [], None
  for spec in specs:
    for seed in seeds:
      workdir = output_dir / "runs" / spec.dirname / f"seed_{seed}"
      done = workdir / "results.json"
      config = run_config(base, spec, seed)
      if done.exists():
        if dataset is None:  # one build for every run of the ablation
          dataset = restore.open_dataset(config)
        runs.check_finished(workdir, config, dataset)
        results = json.loads(done.read_text())
        try:
          restore.verify_checkpoint(workdir, results["best_step"], log=log)
          log(f"{spec.label} seed {seed}: finished earlier, read {done}")
        except CorruptCheckpointError as e:  # its checkpoint rotted: the run repairs itself
          log(f"WARNING: {spec.label} seed {seed}: {e}; running it again in {workdir}")
          results = loop.train_and_evaluate(config, str(workdir))
      elif not train:
        log(f"{spec.label} seed {seed}: not finished, left out")
        continue
      else:
        log(f"{spec.label} seed {seed}: training in {workdir}")
        results = loop.train_and_evaluate(config, str(workdir))
      records.append(record_from_results(spec, seed, results))
      log(f"{spec.label} seed {seed}: val AUC {records[-1]['val_auc']:.4f}, "
          f"test AUC {records[-1]['test_auc']:.4f}")
      if missing_fractions:
        report = robustness.evaluate_missing_modalities(workdir, missing_fractions)
        records[-1]["missing"] = {
            name: {p: m["auc"] for p, m in by_fraction.items() if float(p) > 0}
            for name, by_fraction in report["modalities"].items()}
      # The title names the dataset build the runs trained on (results.json), not the config.
      write_summary(records, output_dir, baseline=baseline, title=results["dataset"])
  if not records:
    raise ConfigError(f"{output_dir}: none of the runs {labels} x seeds {list(seeds)} has "
                      f"finished")
  return records


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def _mean_std(values) -> tuple[float, float]:
  values = [v for v in values if v is not None and not math.isnan(v)]
  if not values:
    return math.nan, math.nan
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(records: Sequence[dict], baseline: str = "din") -> list[dict]:
  """Per model: mean and std of each metric over seeds, and the paired test-AUC difference to
  `baseline` over the seeds both have (mean, std, and whether mean > 2 std). Sorted by test AUC."""
  by_model: dict[str, dict[int, dict]] = {}
  for r in records:
    by_model.setdefault(r["model"], {})[r["seed"]] = r
  base = by_model.get(baseline, {})
  rows = []
  for model, by_seed in by_model.items():
    row = {"model": model, "seeds": len(by_seed)}
    for key in ("val_auc", "test_auc", "test_gauc", "test_logloss", "cold_test_auc",
                "train_seconds", "params"):
      row[key] = _mean_std([r[key] for r in by_seed.values()])
    shared = sorted(set(by_seed) & set(base))
    if base and model != baseline and shared:
      diffs = [by_seed[s]["test_auc"] - base[s]["test_auc"] for s in shared]
      mean, std = _mean_std(diffs)
      base_auc = float(np.mean([base[s]["test_auc"] for s in shared]))
      row["vs_baseline"] = {
          "auc_diff_mean": mean, "auc_diff_std": std, "paired_seeds": len(shared),
          "rel_impr": (float(np.mean([by_seed[s]["test_auc"] for s in shared])) - 0.5)
                      / (base_auc - 0.5) - 1.0,
          "above_two_std": bool(len(shared) > 1 and mean > 2 * std),
      }
    rows.append(row)
  return sorted(rows, key=lambda r: -r["test_auc"][0])


def _fmt(pair, digits=4) -> str:
  mean, std = pair
  return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(rows: Sequence[dict], baseline: str = "din", title: str = "") -> str:
  lines = [f"### {title}" if title else "",
           "",
           f"| model | seeds | val AUC | test AUC | test GAUC | test logloss | cold-item test AUC "
           f"| ΔAUC vs {baseline} (paired) | RelaImpr | > 2 std | params | train s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    vs = r.get("vs_baseline")
    diff = (f"{vs['auc_diff_mean']:+.4f} ± {vs['auc_diff_std']:.4f}" if vs else "—")
    rel = f"{100 * vs['rel_impr']:+.2f}%" if vs else "—"
    sig = ("yes" if vs["above_two_std"] else "no") if vs else "—"
    lines.append(
        f"| {r['model']} | {r['seeds']} | {_fmt(r['val_auc'])} | {_fmt(r['test_auc'])} | "
        f"{_fmt(r['test_gauc'])} | {_fmt(r['test_logloss'])} | {_fmt(r['cold_test_auc'])} | "
        f"{diff} | {rel} | {sig} | {r['params'][0]:,.0f} | {r['train_seconds'][0]:.0f} |")
  lines += ["", "Mean ± sample std over seeds; the model is the best checkpoint by validation AUC. "
            f"RelaImpr = (AUC - 0.5) / (AUC_{baseline} - 0.5) - 1 on the paired seeds; "
            "'> 2 std': mean paired difference above twice its std. Cold items: test targets "
            "with fewer than 5 training examples."]
  return "\n".join(lines) + "\n"


def robustness_table(records: Sequence[dict]) -> str:
  """Markdown: per model, mean +- std over seeds of the test AUC with each modality missing
  for each fraction of the items (records with a 'missing' entry); empty when none has one."""
  cells: dict[str, dict[tuple[str, str], list[float]]] = {}
  for r in records:
    if "missing" in r:
      model = cells.setdefault(r["model"], {})
      model.setdefault(("none", "0"), []).append(r["test_auc"])
      for name, by_fraction in r["missing"].items():
        for p, auc in by_fraction.items():
          model.setdefault((name, p), []).append(auc)
  if not cells:
    return ""
  columns = sorted({c for model in cells.values() for c in model if c[0] != "none"},
                   key=lambda c: (c[0], float(c[1])))
  header = ["model", "seeds", "test AUC"] + [f"{name} missing {100 * float(p):.0f}%"
                                             for name, p in columns]
  lines = ["", "### Robustness: test AUC with a modality missing at evaluation", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for model, values in cells.items():
    row = [model, str(len(values[("none", "0")])), _fmt(_mean_std(values[("none", "0")]))]
    row += [_fmt(_mean_std(values[c])) if c in values else "—" for c in columns]
    lines.append("| " + " | ".join(row) + " |")
  lines += ["", "The best checkpoint of each run, evaluated on test with the modality's vectors "
            "zeroed (and its missing flag set, where the data has one) for a seeded random "
            "fraction of the items, the same items for every model of a seed "
            "(`dmf_jax.train.robustness`). '—': the run's model was restricted to other modalities. "
            "A model that reads no vectors (din) changes only through a missing-flag field."]
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], path: epath.PathLike, title: str = "") -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = [r["model"] for r in rows]
  means = [r["test_auc"][0] for r in rows]
  stds = [r["test_auc"][1] for r in rows]
  fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 4))
  ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
  ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
  low = min(m - s for m, s in zip(means, stds))
  high = max(m + s for m, s in zip(means, stds))
  pad = max(0.005, 0.15 * (high - low))
  ax.set_ylim(low - pad, high + pad)
  ax.set(ylabel="test AUC (mean ± std over seeds)", title=title)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(str(path), dpi=110)
  plt.close(fig)


def _write(path: epath.Path, text: str) -> None:
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(text)
  os.replace(tmp, path)


def write_summary(records: Sequence[dict], output_dir: epath.PathLike, *, baseline: str = "din",
                  title: str = "") -> None:
  """results.json, results.md and results.png in `output_dir`."""
  output_dir = epath.Path(output_dir)
  rows = summarize(records, baseline)
  _write(output_dir / "results.json", jsonio.dumps(list(records), indent=2))
  _write(output_dir / "results.md", markdown_table(rows, baseline, title)
         + robustness_table(records))
  plot(rows, output_dir / "results.png", title)
