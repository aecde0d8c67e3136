"""The model zoo: every registered model by name, with its family's config class.

The only module that imports every family. A model is built from a `FeatureSchema` and its
config; each maps a batch (see `dmf_jax.core.schema`) to logits [B]:

  din               ID only: DIN activation-unit attention over the behaviour sequence.
  dmf               DTA (modality-enriched) + SimTier (modality-centric) + CMM.
  dmf_early_fusion  the same function as `dmf` through early-fusion attention (slower).
  dmf_no_me         ablation: the ME path loses its similarity-bucket side information
                    (ID-only multi-head target attention) and keeps SimTier.
  dmf_no_mc         ablation: DTA only, no SimTier and no CMM.
  din_mm_concat, simscore, simtier, make   baselines (see `dmf_jax.models.baselines`).
  bst               ID only: Behavior Sequence Transformer over the sequence and the target.
  dien              ID only: GRU interests (auxiliary next-behaviour loss) evolved by AUGRU.
  bst_mm_concat, dien_mm_concat   BST / DIEN with the projected modality vectors in their
                    item tokens (multimodal sequence baselines).
  em3               Fusion-Q-Former content tokens, LoRA sequence side, Content-ID loss
                    (see `dmf_jax.models.em3`), with a DIN or DMF head.

Configs: an experiment's flat `model_config` holds the fields of every family (so one command
line works for any model); `model_config(values)` keeps the fields of the named model's family
and builds its typed config, rejecting keys no family knows.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

from flax import nnx

from dmf_jax.core import checks, compat
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.core.schema import FeatureSchema
from dmf_jax.core.sharding import NO_SHARDING, ShardingRules
from dmf_jax.models import baselines
from dmf_jax.models.base import CTRModel, ModelConfig
from dmf_jax.models.bst import BST, BstConfig
from dmf_jax.models.dien import DIEN, DienConfig
from dmf_jax.models.din import DIN, DinConfig
from dmf_jax.models.dmf import DMF, DmfConfig
from dmf_jax.models.em3 import EM3Config, build_em3

ModelFactory = Callable[..., CTRModel]
RETIRED_FIELDS = compat.RETIRED_MODEL_FIELDS  # accepted and ignored (older runs)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """factory(schema, config, *, rngs, catalog, sharding) -> CTRModel; config_class: its family's."""

  factory: ModelFactory
  config_class: type[ModelConfig]


MODELS: dict[str, ModelEntry] = {
    "din": ModelEntry(DIN, DinConfig),
    "dmf": ModelEntry(functools.partial(DMF, attention="dta"), DmfConfig),
    "dmf_early_fusion": ModelEntry(functools.partial(DMF, attention="early_fusion"), DmfConfig),
    "dmf_no_me": ModelEntry(functools.partial(DMF, use_me=False), DmfConfig),
    "dmf_no_mc": ModelEntry(functools.partial(DMF, use_mc=False), DmfConfig),
    "din_mm_concat": ModelEntry(baselines.din_multimodal_concat, baselines.BaselineConfig),
    "simscore": ModelEntry(baselines.SimScore, baselines.BaselineConfig),
    "simtier": ModelEntry(baselines.DinSimTier, baselines.BaselineConfig),
    "make": ModelEntry(baselines.MAKE, baselines.MakeConfig),
    "bst": ModelEntry(BST, BstConfig),
    "dien": ModelEntry(DIEN, DienConfig),
    "bst_mm_concat": ModelEntry(baselines.bst_multimodal_concat, baselines.BstVectorConfig),
    "dien_mm_concat": ModelEntry(baselines.dien_multimodal_concat, baselines.DienVectorConfig),
    "em3": ModelEntry(build_em3, EM3Config),
}


def register_model(name: str, factory: ModelFactory,
                   config_class: type[ModelConfig] = ModelConfig) -> None:
  """Adds a model: `factory(schema, config, *, rngs, catalog, sharding) -> CTRModel`, with the
  config dataclass (a ModelConfig subclass) its config is built as."""
  if name in MODELS:
    raise ValueError(f"model {name!r} is already registered")
  if not (isinstance(config_class, type) and issubclass(config_class, ModelConfig)):
    raise TypeError(f"model {name!r}: config_class must be a ModelConfig subclass")
  MODELS[name] = ModelEntry(factory, config_class)


def model_names() -> Sequence[str]:
  return tuple(sorted(MODELS))


def config_fields() -> dict[str, dataclasses.Field]:
  """Every field of every registered family's config (the experiment's flat model_config)."""
  fields = {}
  for spec in MODELS.values():
    fields.update({f.name: f for f in dataclasses.fields(spec.config_class)})
  return fields


def default_values() -> dict:
  """The defaults of `config_fields()` (without `name`)."""
  values = {}
  for spec in MODELS.values():
    values.update(dataclasses.asdict(spec.config_class()))
  values.pop("name")
  return values


def model_config(values: Mapping) -> ModelConfig:
  """The typed config of model `values['name']` from a flat mapping (dict or ConfigDict).

  Keys of other families are ignored (they do not affect this model); keys no family has are
  an error listing the valid ones.
  """
  values = {k: v for k, v in dict(values).items() if k not in RETIRED_FIELDS}
  name = values.get("name", ModelConfig.name)
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(model_names())}")
  unknown = sorted(set(values) - set(config_fields()))
  if unknown:
    raise ValueError(f"model config: unknown field(s) {unknown}; valid: {sorted(config_fields())}")
  cls = MODELS[name].config_class
  own = {f.name for f in dataclasses.fields(cls)}
  return checks.dataclass_from_mapping(cls, {k: v for k, v in values.items() if k in own},
                                       "model config")


def build_model(
    config: ModelConfig | Mapping,
    schema: FeatureSchema,
    *,
    rngs: nnx.Rngs,
    catalog: ItemCatalog | None = None,
    sharding: ShardingRules = NO_SHARDING,
) -> CTRModel:
  """The registered model `config.name`, built for `schema` (a mapping is read by
  `model_config`; a typed config must be of the model's family)."""
  if not isinstance(config, ModelConfig):
    config = model_config(config)
  if config.name not in MODELS:
    raise ValueError(f"unknown model {config.name!r}; valid models: {', '.join(model_names())}")
  spec = MODELS[config.name]
  if not isinstance(config, spec.config_class):
    config = model_config({**dataclasses.asdict(config)})
  return spec.factory(schema, config, rngs=rngs, catalog=catalog, sharding=sharding)
