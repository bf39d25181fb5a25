"""Training checkpoints (models/best.pt, models/last.pt): the weights beside the configuration that rebuilds
their network (model section + image size; busi.config.NetworkConfig), as nanoGPT keeps the model's arguments
apart from the training state. Loaded with torch.load(weights_only=True): nothing is unpickled."""

from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from busi import BusiError
from busi.config import NetworkConfig
from busi.files import atomic_file
from busi.model.network import build_model


def save_checkpoint(path: Path, model: nn.Module, config: NetworkConfig, **extra) -> None:
    """Weights + the configuration that built them (+ training state in `extra`), written atomically."""
    state = {"model": model.state_dict(), "config": config.model_dump(mode="json"), **extra}
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, NetworkConfig, dict]:
    """Rebuild the network of a checkpoint file (or of `best.pt` in a folder); returns it in eval mode, its
    configuration and the whole stored state."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise BusiError(f"{path}: no such checkpoint") from None
    except Exception as err:  # noqa: BLE001 - any file at all may be handed in: a text file fails with KeyError
        # Not PyTorch's message: it advises weights_only=False, which would run code from an untrusted file.
        raise BusiError(f"{path}: not a readable checkpoint (not a PyTorch file of tensors and plain data: "
                        f"{type(err).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise BusiError(f"{path}: not a busi checkpoint (no network configuration beside the weights; "
                        "a bare state dict does not say which network it fits)")
    config = network_config(state, path)
    return load_network(config, state["model"], path), config, state


def network_config(state: dict, path: Path) -> NetworkConfig:
    try:
        return NetworkConfig.model_validate(state["config"], strict=False)
    except ValidationError as err:
        first = err.errors()[0]
        raise BusiError(f"{path}: invalid network configuration: {'.'.join(map(str, first['loc']))}: "
                        f"{first['msg']}") from None


def load_network(config: NetworkConfig, weights: dict, source: Path | str) -> nn.Module:
    """The network `config` names, with `weights`; a mismatch is one line, not a traceback."""
    # The weights are all here: never fetch pretrained ones just to overwrite them.
    model = build_model(config.model.model_copy(update={"encoder_weights": None}))
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError) as err:
        detail = " ".join(str(err).split())[:300]
        raise BusiError(f"{source}: the weights do not fit the {config.model.encoder} U-Net its configuration "
                        f"names ({detail})") from None
    return model.eval()
