"""Validation-only hyperparameter search: random search or successive halving, resumable.

`tune(base, model, trials, output_dir)` (model: a registered model, or a variant of the base
config, which is tuned from its own values) samples `trials` settings from the model's search
space (`search_space`: the optimizer's learning rates and weight decay, and the knobs its
family's config class lists, `ModelConfig.search_space`; trial 0 is the base config's own
values, `base_values`, so the starting point competes), trains each in
DIR/trials/trial_<k>/ with the test split left out of the dataset
(`loop.train_and_evaluate(..., test=False)`: nothing can read it), and ranks them by best
validation AUC. Successive halving (`method='halving'`) trains all trials for
`min_epochs`, keeps the best 1/eta, resumes those for eta times the epochs, and so on up to
the config's num_epochs (a trial's workdir resumes: num_epochs may grow on resume).

DIR/trials.jsonl holds one line per finished (trial, rung); DIR/best.json the chosen values,
as a `per_model` entry for a study config (for a variant, its `variants` entry);
DIR/trials.md the trials as a table. A re-run reads what is there and trains only what is
missing; a different search (model, seed, trials, method) in the same DIR is refused.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from dmf_jax.core import compat, jsonio
from dmf_jax.core.errors import ConfigError
from dmf_jax.models import registry
from dmf_jax.train import config as config_lib
from dmf_jax.train import loop

METHODS = ("random", "halving")


def _log_uniform(low: float, high: float) -> Callable[[np.random.Generator], float]:
  return lambda rng: float(np.exp(rng.uniform(math.log(low), math.log(high))))


def _choice(values) -> Callable[[np.random.Generator], object]:
  return lambda rng: values[int(rng.integers(len(values)))]


def search_space(model: str, knobs: Sequence[str] | None = None
                 ) -> dict[str, Callable[[np.random.Generator], object]]:
  """{dotted config path: sampler} for `model`, in the order `sample` draws them (the model
  knobs in `compat.TUNING_DRAW_ORDER` first); `knobs` (paths, or model field names): only
  those, the others left at the base config's values."""
  family = registry.MODELS[model].config_class.search_space()
  order = {name: i for i, name in enumerate(compat.TUNING_DRAW_ORDER)}
  space = {
      "optimizer.learning_rate": _log_uniform(3e-4, 1e-2),
      "optimizer.embedding_learning_rate": _log_uniform(3e-4, 3e-2),
      "optimizer.weight_decay": _choice([0.0, 1e-5, 1e-4, 1e-3]),
  }
  for name in sorted(family, key=lambda name: order.get(name, len(order))):
    # A family's knob is a model_config field, or a dotted path (e.g. EM3's
    # optimizer.content_learning_rate).
    space[name if "." in name else f"model_config.{name}"] = _choice(family[name])
  if knobs is None:
    return space
  paths = [k if k in space else f"model_config.{k}" for k in knobs]
  unknown = [k for k, path in zip(knobs, paths) if path not in space]
  if unknown:
    raise ConfigError(f"knobs: {unknown} not in {model}'s search space: {', '.join(space)}")
  return {path: sampler for path, sampler in space.items() if path in paths}


def sample(model: str, trials: int, seed: int, knobs: Sequence[str] | None = None
           ) -> list[dict]:
  """`trials` settings {path: value}, the same for the same (model, trials, seed, knobs)."""
  rng = np.random.default_rng(seed)
  space = search_space(model, knobs)
  return [{path: sampler(rng) for path, sampler in space.items()} for _ in range(trials)]


def registered_model(base: ml_collections.ConfigDict, model: str) -> str:
  """The registered model that `model` names: itself, or the model a variant of the base
  config varies (e.g. a study's `em3_dmf_tuned` -> em3), as `config.with_model_values`
  resolves it (a name that is neither raises there, listing both)."""
  config = copy.deepcopy(base)
  with config.unlocked():
    config.model = model
  return config_lib.with_model_values(config).model


def base_values(base: ml_collections.ConfigDict, model: str,
                knobs: Sequence[str] | None = None) -> dict:
  """{path: value} of the search space's paths in `base` for `model` (a registered model or
  a variant of the config; its study values applied); a path the config leaves unset (None,
  e.g. no separate embedding rate) is left out, so the trial trains exactly the base config."""
  config = trial_config(base, model, {}, base.num_epochs)
  values = {}
  for path in search_space(registered_model(base, model), knobs):
    node = config
    for name in path.split("."):
      node = node[name]
    if node is not None:
      values[path] = tuple(node) if isinstance(node, list) else node
  return values


def trial_config(base: ml_collections.ConfigDict, model: str, values: dict, epochs: int
                 ) -> ml_collections.ConfigDict:
  """The base config for `model` (its study values applied) with a trial's values and epochs."""
  config = copy.deepcopy(base)
  with config.unlocked():
    config.model = model
  config = config_lib.with_model_values(config)
  with config.unlocked():
    for path, value in values.items():
      node = config
      *parents, leaf = path.split(".")
      for name in parents:
        node = node[name]
      node[leaf] = value
    if "optimizer.embedding_learning_rate" in values and not config.optimizer.embedding_name:
      config.optimizer.embedding_name = config.optimizer.name
    config.num_epochs = epochs
    config.progress = False
  return config


def rungs(method: str, min_epochs: int, max_epochs: int, eta: int) -> list[int]:
  """The epoch budgets of the rungs: [max] for random search; min, min*eta, ..., max."""
  if method == "random":
    return [max_epochs]
  out, epochs = [], min_epochs
  while epochs < max_epochs:
    out.append(epochs)
    epochs *= eta
  return out + [max_epochs]


def _jsonable(values: dict) -> dict:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _cell(value) -> str:
  if value is None:
    return "—"
  if isinstance(value, float):
    return f"{value:.2g}"
  if isinstance(value, (list, tuple)):
    return "x".join(map(str, value))
  return str(value)


def trials_table(records: list[dict]) -> str:
  """Markdown: one row per (trial, rung) by rung, then validation AUC; '—' = left at the
  base config's value (unset)."""
  paths = list(dict.fromkeys(p for r in records for p in r["values"]))
  lines = ["| trial | epochs | val AUC | train s | " + " | ".join(paths) + " |",
           "|---" * (4 + len(paths)) + "|"]
  for r in sorted(records, key=lambda r: (r["epochs"], -r["val_auc"])):
    lines.append(f"| {r['trial']} | {r['epochs']} | {r['val_auc']:.4f} | "
                 f"{r['train_seconds']:.0f} | "
                 + " | ".join(_cell(r["values"].get(p)) for p in paths) + " |")
  return "\n".join(lines) + "\n"


def _nested(values: dict) -> dict:
  out: dict = {}
  for path, value in values.items():
    node = out
    *parents, leaf = path.split(".")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return out


def tune(base: ml_collections.ConfigDict, model: str, trials: int, output_dir: epath.PathLike,
         *, method: str = "random", seed: int = 0, min_epochs: int = 1, eta: int = 3,
         knobs: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) the search; returns the best.json record (see the module docstring).
  knobs: search only these (`search_space`), e.g. a model's own knobs on top of its ranker's
  tuned values."""
  if method not in METHODS:
    raise ConfigError(f"method: {method!r} is not one of {METHODS}")
  family = registered_model(base, model)
  if family not in registry.MODELS:
    raise ConfigError(f"model: unknown model {model!r}; valid models: "
                      f"{', '.join(registry.model_names())}")
  if trials < 1 or eta < 2 or min_epochs < 1:
    raise ConfigError("trials must be >= 1, eta >= 2 and min_epochs >= 1")
  knobs = list(knobs) if knobs else None
  search_space(family, knobs)  # an unknown knob is refused before anything is written
  output_dir = epath.Path(output_dir).expanduser()
  output_dir.mkdir(parents=True, exist_ok=True)
  search = {"model": model, "trials": trials, "method": method, "seed": seed,
            "min_epochs": min_epochs, "eta": eta, "max_epochs": base.num_epochs}
  if knobs:  # absent otherwise, so searches recorded before knobs existed stay the same
    search["knobs"] = knobs
  search_file = output_dir / "search.json"
  if search_file.exists() and json.loads(search_file.read_text()) != search:
    raise ConfigError(f"{output_dir} holds another search ({search_file}); use a new "
                      f"--output_dir")
  search_file.write_text(json.dumps(search, indent=2))
  settings = [base_values(base, model, knobs)] + sample(family, trials - 1, seed, knobs)
  for values in settings:  # every trial's config is checked before anything trains
    config_lib.validate(trial_config(base, model, values, base.num_epochs),
                        num_devices=jax.device_count(), num_processes=jax.process_count())
  records_file = output_dir / "trials.jsonl"
  done = {}
  if records_file.exists():
    for line in records_file.read_text().splitlines():
      r = json.loads(line)
      done[(r["trial"], r["epochs"])] = r
  alive = list(range(trials))
  for rung, epochs in enumerate(rungs(method, min_epochs, base.num_epochs, eta)):
    scores = {}
    for k in alive:
      if (k, epochs) not in done:
        log(f"trial {k} ({epochs} epochs): training")
        results = loop.train_and_evaluate(trial_config(base, model, settings[k], epochs),
                                          str(output_dir / "trials" / f"trial_{k}"), test=False)
        record = {"trial": k, "rung": rung, "epochs": epochs,
                  "val_auc": results["validation"]["auc"], "best_step": results["best_step"],
                  "train_seconds": results["train_seconds"], "values": _jsonable(settings[k])}
        with records_file.open("a") as f:
          f.write(jsonio.dumps(record) + "\n")
        done[(k, epochs)] = record
      scores[k] = done[(k, epochs)]["val_auc"]
      log(f"trial {k} ({epochs} epochs): val AUC {scores[k]:.4f}")
    keep = max(1, len(alive) // eta) if method == "halving" else len(alive)
    alive = sorted(alive, key=lambda k: -scores[k])[:keep]
  best_trial = alive[0]
  best = done[(best_trial, max(e for (k, e) in done if k == best_trial))]
  # For a study config: a model's `per_model` entry, or the values to merge into a variant.
  entry = "per_model" if family == model else "variants"
  record = {"model": model, "trial": best_trial, "val_auc": best["val_auc"],
            "values": best["values"], entry: {model: _nested(best["values"])},
            "search": search}
  jsonio.write_json(output_dir / "best.json", record)
  (output_dir / "trials.md").write_text(trials_table(list(done.values())))
  return record
