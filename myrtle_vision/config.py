"""Typed, validated configs.

A train config (``train_configs/*.json``) has the sections ``train_config``, ``data_config_path``,
``dist_config``, ``vit_config`` and optionally ``distiller_config``; the data config it points to
is loaded with it. Every field is checked when the file is loaded: an unknown name (with the
nearest valid one suggested), a wrong type, a missing required field or an impossible value is a
:class:`~myrtle_vision.errors.ConfigError` naming the file and the field.

Relative paths in configs (``data_config_path``, ``dataset_path``, ``output_directory``,
``checkpoint_path``, ``teacher_weights_path``) are relative to the working directory, as in the
earlier release.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, did_you_mean
from .quantization import POST_TRAINING_FORMATS, Q_FORMATS, ROUNDINGS
from .teachers import teacher_name_problem
from .transforms import OpError, parse_ops, per_image_only

AUGMENT_ON = ("auto", "device", "workers")

OPTIMIZERS = ("adamw", "adam", "sgd")
PRETRAINED_FORMATS = ("timm", "deit", "torchvision")  # who wrote vit_config.pretrained_weights
SCHEDULERS = ("cosine", "step", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
DIST_URL_SCHEMES = ("env", "tcp", "file")  # the init methods torch.distributed knows


@dataclass
class TrainConfig:
    output_directory: str
    epochs: int
    local_batch_size: int
    global_batch_size: int
    lr: float
    checkpoint_path: str = ""
    iters_per_checkpoint: int = 1000
    iters_per_val: int = 1000
    epochs_per_val: int = 1  # validation also runs at the end of every this-many epochs, and of the last one
    seed: int = 1234
    drop_last_batch: bool = True
    # Sampling and class balance (all off by default; see docs/config.md):
    repeated_augmentation: int = 1  # k > 1: each sampled image comes k times in a row, augmented differently (DeiT: 3)
    class_weights: str | list[float] | None = None  # null, "balanced" or one weight per class
    class_balanced_sampler: bool = False  # draw each epoch's images with replacement, every class equally often
    optimizer: str = "adamw"
    opt_eps: float = 1e-8
    opt_betas: list[float] | None = None
    clip_grad: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.05
    scheduler: str = "cosine"
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    warmup_epochs: float = 5
    decay_epochs: float = 30
    decay_rate: float = 0.1
    label_smoothing: float = 0.0  # the earlier release trained with plain cross entropy
    num_workers: int | None = None  # loader worker processes; None: this process's share of the CPUs
    keep_checkpoints: int | None = 5
    precision: str = "fp32"  # fp32, bf16 (autocast; CPU or CUDA) or fp16 (autocast and a gradient scaler; CUDA)
    compile: bool = False  # torch.compile the training step's model
    nonfinite_loss: str = "stop"  # a NaN/inf loss: "stop" the run (nothing saved) or "skip" the update
    layer_decay: float | None = None  # finetuning: block i's lr is lr * layer_decay ** (depth + 1 - (i + 1))
    # lr is the rate for this many images per update; the peak is lr * global_batch_size / lr_base_size
    # (DeiT's linear scaling rule, as the earlier release applied it); None: lr is the peak itself.
    lr_base_size: int | None = 512
    # The class and distillation tokens and the position embedding take weight decay, as in the earlier
    # release (its model exempted nothing but biases and norms); false: exempt them, as timm and DeiT do.
    weight_decay_tokens: bool = True
    # DeiT's regularisation recipe (all off by default, as in the earlier release; see docs/recipe.md)
    mixup: float = 0.0  # MixUp's Beta alpha (DeiT: 0.8); 0: off
    cutmix: float = 0.0  # CutMix's Beta alpha (DeiT: 1.0); 0: off
    mixup_prob: float = 1.0  # the probability that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # with both on: the probability of CutMix rather than MixUp
    random_erasing: float = 0.0  # the probability that an image has a box erased (DeiT: 0.25)
    ema_decay: float | None = None  # an exponential moving average of the weights (DeiT: 0.99996); None: off
    ema_every: int = 1  # updates between two updates of the average
    ema_deploy: bool = True  # the average is what best.pt follows and what the checkpoint's model entry holds
    # Accepted for compatibility with the earlier release; see docs/config.md for what happens to them.
    lr_noise: list[float] | None = None
    lr_noise_pct: float = 0.67
    lr_noise_std: float = 1.0
    patience_epochs: float = 10
    cooldown_epochs: float = 0
    distributed: bool = False

    @property
    def peak_lr(self) -> float:
        """The learning rate the schedule rises to: ``lr`` scaled to ``global_batch_size`` (see ``lr_base_size``)."""
        if self.lr_base_size is None:
            return self.lr
        return self.lr * self.global_batch_size / self.lr_base_size

    def describe_lr(self) -> str:
        """The peak learning rate, and how it follows from the config, for the start-up line."""
        if self.lr_base_size is None:
            return f"peak learning rate {self.peak_lr:.4g} (train_config.lr; lr_base_size is null, so it is not scaled)"
        return (
            f"peak learning rate {self.peak_lr:.4g} = train_config.lr {self.lr:g} x global_batch_size "
            f"{self.global_batch_size} / lr_base_size {self.lr_base_size}"
        )

    def validate(self, v: _Validator) -> None:
        for name in (
            "epochs",
            "local_batch_size",
            "global_batch_size",
            "iters_per_checkpoint",
            "iters_per_val",
            "epochs_per_val",
        ):
            v.check(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("lr", "warmup_lr", "min_lr", "weight_decay", "warmup_epochs", "cooldown_epochs", "momentum"):
            v.check(getattr(self, name) >= 0, name, "must not be negative")
        v.check(
            self.global_batch_size % self.local_batch_size == 0,
            "global_batch_size",
            f"{self.global_batch_size} is not a multiple of local_batch_size {self.local_batch_size}",
        )
        v.choice(self.optimizer, OPTIMIZERS, "optimizer")
        v.choice(self.scheduler, SCHEDULERS, "scheduler")
        v.choice(self.precision, PRECISIONS, "precision")
        v.choice(self.nonfinite_loss, ("stop", "skip"), "nonfinite_loss")
        v.check(self.layer_decay is None or 0 < self.layer_decay <= 1, "layer_decay", "must be null or in (0, 1]")
        v.check(
            self.lr_base_size is None or 1 <= self.lr_base_size <= 2**31, "lr_base_size", "must be null or in [1, 2^31]"
        )
        for name in ("local_batch_size", "global_batch_size"):
            v.check(getattr(self, name) <= 2**31, name, "must be at most 2^31")
        v.check(self.opt_eps > 0, "opt_eps", "must be positive")
        if self.opt_betas is not None:
            v.check(
                len(self.opt_betas) == 2 and all(0 <= b < 1 for b in self.opt_betas),
                "opt_betas",
                "must be null or two numbers in [0, 1)",
            )
        v.check(self.clip_grad is None or self.clip_grad > 0, "clip_grad", "must be null or positive")
        v.check(self.momentum <= 1, "momentum", "must be in [0, 1]")
        v.check(self.decay_epochs > 0, "decay_epochs", "must be positive")
        v.check(0 < self.decay_rate <= 1, "decay_rate", "must be in (0, 1]")
        v.check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        v.check(
            self.num_workers is None or 0 <= self.num_workers <= 1024, "num_workers", "must be null or in [0, 1024]"
        )
        v.check(0 <= self.seed < 2**63, "seed", "must be in [0, 2^63)")
        v.check(
            self.keep_checkpoints is None or self.keep_checkpoints >= 1,
            "keep_checkpoints",
            "must be null or at least 1",
        )
        v.check(self.lr_noise is None, "lr_noise", "learning-rate noise is not supported; set it to null")
        for name in ("mixup", "cutmix"):
            v.check(0 <= getattr(self, name) <= 100, name, "must be in [0, 100] (0: off)")
        for name in ("mixup_prob", "mixup_switch_prob", "random_erasing"):
            v.check(0 <= getattr(self, name) <= 1, name, "must be a probability, in [0, 1]")
        v.check(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "must be null or in (0, 1)")
        v.check(self.ema_every >= 1, "ema_every", "must be at least 1")
        self._validate_sampling(v)

    def _validate_sampling(self, v: _Validator) -> None:
        """repeated_augmentation and class_weights (their length is checked against the data config by
        :meth:`Config.validate_with_data`)."""
        v.check(
            1 <= self.repeated_augmentation <= 2**31,
            "repeated_augmentation",
            "must be in [1, 2^31] (1: off; DeiT uses 3)",
        )
        weights = self.class_weights
        if isinstance(weights, str):
            v.choice(weights, ("balanced",), "class_weights")
        elif weights is not None:
            v.check(
                all(w >= 0 for w in weights) and any(w > 0 for w in weights),
                "class_weights",
                'must be null, "balanced" or a list of non-negative numbers, one per class, not all 0',
            )


@dataclass
class DistConfig:
    dist_backend: str = "nccl"
    dist_url: str = "env://"  # not used (torchrun's rendezvous gives the address), but it must be a URL torch could use

    def validate(self, v: _Validator) -> None:
        v.choice(self.dist_backend, ("nccl", "gloo"), "dist_backend")
        scheme, sep, _ = self.dist_url.partition("://")
        v.check(
            bool(sep) and scheme in DIST_URL_SCHEMES,
            "dist_url",
            f"{json.dumps(self.dist_url)[:80]} is not a torch.distributed init URL (env://, tcp://HOST:PORT or "
            "file://PATH); it is not used (torchrun's rendezvous gives the address), so the default env:// will do",
        )


MAX_PARAMETERS = 4_000_000_000  # ViT-Huge has 0.63e9; beyond this a model does not fit a GPU's memory anyway


@dataclass
class VitConfig:
    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    heads: int
    mlp_dim: int
    dropout: float = 0.0
    emb_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth: the last block's rate, rising linearly from 0 (DeiT-Tiny: 0.1)
    q_format: str = (
        "FP32"  # FP32 trains in FP32; FP16_32 etc. train with it simulated (QAT); PyTorchINT8: FP32 (PTQ only)
    )
    q_rounding: str = "nearest_even"  # or "qtorch": ties away from zero, saturating
    qkv_bias: bool = False  # biases on q, k, v: the deploy layout gains to_qkv.bias entries
    layer_norm_eps: float = 1e-5
    pretrained_weights: str = (
        ""  # a timm, DeiT or torchvision ViT file to start from (see myrtle_vision.weights.foreign)
    )
    pretrained_format: str = "timm"

    @property
    def trained_q_format(self) -> str:
        """The format training (and test.py) simulates: a post-training format such as PyTorchINT8 is
        applied by test_quantize.py alone, so training runs in FP32, as in the earlier release."""
        return "FP32" if self.q_format in POST_TRAINING_FORMATS else self.q_format

    def parameter_count(self, num_classes: int = 1000) -> int:
        """About how many parameters the model has (to refuse one that cannot be built)."""
        d, patches = self.embed_dim, (self.image_size // self.patch_size) ** 2
        block = 4 * d * d + 2 * d * self.mlp_dim + self.mlp_dim + 6 * d
        return 3 * self.patch_size**2 * d + (patches + 2) * d + self.depth * block + (d + 1) * num_classes

    def validate(self, v: _Validator) -> None:
        for name in ("image_size", "patch_size", "embed_dim", "depth", "heads", "mlp_dim"):
            v.check(getattr(self, name) >= 1, name, "must be at least 1")
        v.check(
            self.image_size % self.patch_size == 0,
            "image_size",
            f"{self.image_size} is not divisible by patch_size {self.patch_size}",
        )
        v.check(
            self.embed_dim % self.heads == 0, "embed_dim", f"{self.embed_dim} is not divisible by heads {self.heads}"
        )
        params = self.parameter_count()
        v.check(
            params <= MAX_PARAMETERS,
            "embed_dim/depth/mlp_dim/image_size",
            f"embed_dim {self.embed_dim}, depth {self.depth}, mlp_dim {self.mlp_dim} and "
            f"{(self.image_size // self.patch_size) ** 2} patches (image_size {self.image_size}, patch_size "
            f"{self.patch_size}) make {float(min(params, 10**300)):.3g} parameters; "
            f"at most {MAX_PARAMETERS:.0g} are supported",
        )
        for name in ("dropout", "emb_dropout", "drop_path"):
            v.check(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
        v.choice(self.q_format, Q_FORMATS + POST_TRAINING_FORMATS, "q_format")
        v.choice(self.q_rounding, ROUNDINGS, "q_rounding")
        v.check(0 < self.layer_norm_eps < 1, "layer_norm_eps", "must be in (0, 1)")
        v.choice(self.pretrained_format, PRETRAINED_FORMATS, "pretrained_format")


@dataclass
class DistillerConfig:
    teacher_weights_path: str
    temperature: float = 3.0
    alpha: float = 0.5
    distillation_type: str = "soft"
    teacher_model: str = "resnet50"
    teacher_image_size: int | None = None  # the teacher sees the batches resized to this; None: as the student

    def validate(self, v: _Validator) -> None:
        v.check(self.temperature > 0, "temperature", "must be positive")
        v.check(
            self.teacher_image_size is None or 8 <= self.teacher_image_size <= 4096,
            "teacher_image_size",
            "must be null or in [8, 4096]",
        )
        v.check(0 <= self.alpha <= 1, "alpha", "must be in [0, 1]")
        v.choice(self.distillation_type, ("soft", "hard"), "distillation_type")
        v.check(bool(self.teacher_weights_path), "teacher_weights_path", "must not be empty")
        problem = teacher_name_problem(self.teacher_model)
        if problem:
            v.fail("teacher_model", problem)


@dataclass
class DataConfig:
    dataset_path: str
    train_files: str
    valid_files: str
    test_files: str
    label_map: str
    number_of_classes: int
    transform_ops_train: dict
    transform_ops_val: dict
    decode_cache: bool = True  # decode each image once into a memory-mapped cache (see myrtle_vision.data.cache)
    cache_dir: str | None = None  # where; None: $XDG_CACHE_HOME/myrtle_vision (~/.cache/myrtle_vision)
    augment_on: str = "auto"  # where the ops run: auto (the GPU when training on one), device, workers
    path: str = field(default="the data config", repr=False)  # the file it was loaded from, for error messages

    def validate(self, v: _Validator) -> None:
        v.check(self.number_of_classes >= 2, "number_of_classes", "must be at least 2")
        v.choice(self.augment_on, AUGMENT_ON, "augment_on")
        for name in ("transform_ops_train", "transform_ops_val"):
            try:
                parsed = parse_ops(getattr(self, name))
            except OpError as e:
                v.fail(f"{name}.{e.where}" if e.where else name, e.problem)
            per_image = per_image_only(parsed)
            v.check(
                self.augment_on != "device" or not per_image,
                "augment_on",
                f"device: {name} has {', '.join(per_image)}, which runs per image only; use auto or workers",
            )


@dataclass
class Config:
    """A whole train config, with its data config loaded."""

    train_config: TrainConfig
    data_config_path: str
    vit_config: VitConfig
    data_config: DataConfig | None = None  # loaded from data_config_path; inline only in saved configs
    dist_config: DistConfig = field(default_factory=DistConfig)
    distiller_config: DistillerConfig | None = None
    path: str = ""  # the file it was loaded from, for error messages

    def validate(self, v: _Validator) -> None:
        """The rules between sections (each section checks its own fields first)."""
        tc, vc = self.train_config, self.vit_config
        v.check(
            tc.precision == "fp32" or vc.trained_q_format == "FP32",
            "train_config.precision",
            f"{tc.precision} with vit_config.q_format {vc.q_format}: quantization-aware training simulates "
            "its format in FP32; set precision to fp32",
        )
        if self.data_config is not None:
            self.validate_with_data(v)

    def validate_with_data(self, v: _Validator) -> None:
        """The rules between the train config and its data config (checked once the data config is loaded)."""
        weights, dc = self.train_config.class_weights, self.data_config
        v.check(
            not isinstance(weights, list) or len(weights) == dc.number_of_classes,
            "train_config.class_weights",
            f"{len(weights or [])} weights, but {dc.path}: number_of_classes is {dc.number_of_classes}",
        )

    def to_dict(self) -> dict:
        """The resolved config (every default filled in), as saved with each checkpoint."""
        out = dataclasses.asdict(self)
        out.pop("path")
        if out["data_config"] is not None:
            out["data_config"].pop("path")
        return out


# Fields the user's README names differently; the value is moved to the canonical name.
ALIASES = {"vit_config": {"q_config": "q_format"}}


class _Validator:
    def __init__(self, path, prefix: str):
        self.path, self.prefix = path, prefix

    def fail(self, name: str, problem: str):
        raise ConfigError(self.path, f"{self.prefix}{name}", problem)

    def check(self, ok: bool, name: str, problem: str):
        if not ok:
            self.fail(name, problem)

    def choice(self, value: str, choices, name: str):
        if value not in choices:
            self.fail(name, f"{value!r} is not one of {', '.join(choices)}" + did_you_mean(value, choices))


_UNIONS = (typing.Union, types.UnionType)  # Optional[X] and X | None


def _type_ok(value: Any, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNIONS:
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # finite: JSON parsers accept NaN and Infinity, and huge integers overflow a float
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and abs(value) <= 1e300
            and math.isfinite(value)
        )
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(x, args[0]) for x in value)
    if tp is dict:
        return isinstance(value, dict)
    raise TypeError(f"unsupported config type {tp}")


def _type_name(tp) -> str:
    names = {
        bool: "true/false",
        int: "an integer",
        float: "a finite number",
        str: "a string",
        dict: "an object",
        type(None): "null",
    }
    if typing.get_origin(tp) in _UNIONS:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).split(' ', 1)[-1]}s"
    return names.get(tp, str(tp))


def build(cls, data: Any, path, prefix: str = ""):
    """Build dataclass ``cls`` from a JSON object, checking names, types and values."""
    if not isinstance(data, dict):
        raise ConfigError(path, prefix.rstrip("."), f"expected an object, got {type(data).__name__}")
    data = dict(data)
    for alias, name in ALIASES.get(prefix.rstrip("."), {}).items():
        if alias in data:
            if name in data:
                raise ConfigError(path, f"{prefix}{alias}", f"give either {alias} or {name}, not both")
            data[name] = data.pop(alias)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
    for key in data:
        if key not in fields:
            raise ConfigError(path, f"{prefix}{key}", "unknown field" + did_you_mean(key, fields))
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(path, f"{prefix}{name}", "missing required field")
            continue
        value, tp = data[name], hints[name]
        if dataclasses.is_dataclass(tp) or (
            typing.get_origin(tp) in _UNIONS and dataclasses.is_dataclass(typing.get_args(tp)[0])
        ):
            sub = tp if dataclasses.is_dataclass(tp) else typing.get_args(tp)[0]
            kwargs[name] = None if value is None and sub is not tp else build(sub, value, path, f"{prefix}{name}.")
            continue
        if not _type_ok(value, tp):
            raise ConfigError(path, f"{prefix}{name}", f"expected {_type_name(tp)}, got {json.dumps(value)}")
        kwargs[name] = float(value) if tp is float else value
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(_Validator(path, prefix))
    return obj


def read_json(path) -> Any:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not a JSON text file (it is not UTF-8)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(path, "", f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ConfigError(path, "", "nested too deeply to be a config") from None


def load_data_config(path) -> DataConfig:
    cfg = build(DataConfig, read_json(path), path)
    cfg.path = str(path)
    return cfg


def load_config(path) -> Config:
    """Load and validate a train config and the data config it names."""
    raw = read_json(path)
    if isinstance(raw, dict) and "data_config" in raw:
        raise ConfigError(path, "data_config", "unknown field (did you mean 'data_config_path'?)")
    cfg = build(Config, raw, path)
    if not Path(cfg.data_config_path).is_file():
        raise ConfigError(path, "data_config_path", f"{cfg.data_config_path}: file not found")
    cfg.data_config = load_data_config(cfg.data_config_path)
    cfg.validate_with_data(_Validator(path, ""))
    cfg.path = str(path)
    return cfg
