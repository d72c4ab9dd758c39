"""Configuration of CIFAR-style ResNets (He et al. 2016, section 4.2).

Self-contained (torch and transformers only): ``save_pretrained`` copies this file beside the
weights, so the folder loads with ``trust_remote_code=True`` where stim_hf is not installed.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PreTrainedConfig

__all__ = ["CifarResNetConfig", "CifarResNetConfigError"]


class CifarResNetConfigError(ValueError):
    """A :class:`CifarResNetConfig` value is invalid; the message names the field, the value and the valid values.

    A ``ValueError`` defined here, not stim_hf's ``ConfigError``, so that this file needs nothing of
    stim_hf; stim_hf reports it as a ``ConfigError`` where it builds or loads a model.
    """


def _is_int(value: Any) -> bool:
    """Whether ``value`` is an integer and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_depths(num_stages: int, depth: Any = None) -> str:
    """Describe the depths that fit ``num_stages`` stages of basic blocks (and the ones nearest ``depth``)."""
    step = 2 * num_stages
    text = ", ".join(str(step * n + 2) for n in range(1, 6)) + ", ..."
    if num_stages == 3:
        text += "; ResNet-20/32/44/56/110 have n = 3/5/7/9/18"
    if _is_int(depth) and depth > step + 2:
        below = (depth - 2) // step * step + 2
        text += f"; nearest: {below}, {below + step}"
    return text


class CifarResNetConfig(PreTrainedConfig):
    """Configuration of a CIFAR-style ResNet (ResNet-20/32/44/56/110 of He et al. 2016).

    A 3x3 stem convolution, then one stage of basic blocks per entry of ``widths`` (every stage but the
    first halves the resolution in its first block), global average pooling and a linear classifier.

    Args:
        depth: Number of weighted layers, ``2 * (blocks in all stages) + 2``. With the default 3 stages it
            must be ``6n + 2`` (8, 14, 20, 26, 32, ..., 56, ..., 110), giving ``n`` blocks per stage. Ignored
            (recomputed) when ``blocks_per_stage`` is given.
        widths: Output channels of each stage; its length is the number of stages.
        num_channels: Channels of the input images.
        shortcut: Shortcut of the blocks that change shape: ``"projection"`` (1x1 convolution + batch
            norm, option B of the paper) or ``"padding"`` (parameter-free subsampling and zero channel
            padding, option A, as used for the paper's CIFAR results). Blocks whose input and output shapes
            match always use an identity shortcut.
        blocks_per_stage: Number of blocks in each stage, overriding the uniform ``n`` derived from
            ``depth`` (for example ``[3, 2, 3]`` for a sub-network of ResNet-20 exported on its own).
        resize_input_to: Side the model resizes its input to before the stem (bilinear, no antialiasing,
            the width keeping the aspect ratio), or ``None`` to take the input as given. Stimulative
            training resizes a sub-network's batch this way; a sub-network exported to run at a smaller
            input sets it, so that it sees its input resized exactly as in training while its image
            processor keeps the size the full network was trained at.
        kwargs: Standard :class:`~transformers.PreTrainedConfig` arguments (``num_labels``, ``id2label``,
            ``label2id``, ...).

    Raises:
        CifarResNetConfigError: (a ``ValueError``) when a value is invalid; the message names the field,
            the value and the valid values.
    """

    model_type = "cifar_resnet"
    shortcut_types: ClassVar[tuple[str, ...]] = ("projection", "padding")

    depth: int = 20
    widths: list[int] | tuple[int, ...] = (16, 32, 64)
    num_channels: int = 3
    shortcut: str = "projection"
    blocks_per_stage: list[int] | tuple[int, ...] | None = None
    resize_input_to: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        """Validate and normalise the fields, then run the standard config set-up."""
        self._validate_architecture_fields()
        super().__post_init__(**kwargs)
        num_labels = self.num_labels
        if not _is_int(num_labels) or num_labels < 1:
            raise CifarResNetConfigError(f"num_labels={num_labels!r} is invalid (valid: an integer >= 1)")

    def _validate_architecture_fields(self) -> None:
        """Check ``widths``, ``blocks_per_stage``, ``depth``, ``num_channels`` and ``shortcut``."""
        widths = self.widths
        if not isinstance(widths, (list, tuple)) or len(widths) == 0 or not all(_is_int(w) and w >= 1 for w in widths):
            raise CifarResNetConfigError(
                f"widths={widths!r} is invalid (valid: a non-empty list of positive integers, "
                "one per stage, e.g. [16, 32, 64])"
            )
        self.widths = list(widths)
        num_stages = len(self.widths)

        if self.blocks_per_stage is not None:
            blocks = self.blocks_per_stage
            if (
                not isinstance(blocks, (list, tuple))
                or len(blocks) != num_stages
                or not all(_is_int(b) and b >= 1 for b in blocks)
            ):
                raise CifarResNetConfigError(
                    f"blocks_per_stage={blocks!r} is invalid (valid: None, or a list of {num_stages} "
                    f"integers >= 1, one per entry of widths={self.widths})"
                )
            self.blocks_per_stage = list(blocks)
            self.depth = 2 * sum(self.blocks_per_stage) + 2
        else:
            depth = self.depth
            step = 2 * num_stages
            if not _is_int(depth) or depth < step + 2 or (depth - 2) % step != 0:
                raise CifarResNetConfigError(
                    f"depth={depth!r} is not of the form {step}n+2 with n >= 1 for {num_stages} stages "
                    f"(valid: {_valid_depths(num_stages, depth)})"
                )

        if not _is_int(self.num_channels) or self.num_channels < 1:
            raise CifarResNetConfigError(
                f"num_channels={self.num_channels!r} is invalid (valid: a positive integer, e.g. 3 for RGB)"
            )

        if self.resize_input_to is not None and (not _is_int(self.resize_input_to) or self.resize_input_to < 1):
            raise CifarResNetConfigError(
                f"resize_input_to={self.resize_input_to!r} is invalid (valid: None, or an integer >= 1: the input "
                "side in pixels)"
            )

        if self.shortcut not in self.shortcut_types:
            raise CifarResNetConfigError(
                f"shortcut={self.shortcut!r} is invalid (valid: {', '.join(map(repr, self.shortcut_types))})"
            )
        if self.shortcut == "padding":
            for i in range(1, num_stages):
                if self.widths[i] < self.widths[i - 1]:
                    raise CifarResNetConfigError(
                        f"shortcut='padding' needs non-decreasing widths, got widths={self.widths} "
                        f"(stage {i} narrows {self.widths[i - 1]} -> {self.widths[i]}); use "
                        "shortcut='projection' or non-decreasing widths"
                    )

    @property
    def num_stages(self) -> int:
        """Number of stages (the length of ``widths``)."""
        return len(self.widths)

    @property
    def stage_depths(self) -> list[int]:
        """Number of blocks in each stage: ``blocks_per_stage`` if given, else ``n`` from ``depth``."""
        if self.blocks_per_stage is not None:
            return list(self.blocks_per_stage)
        n = (self.depth - 2) // (2 * self.num_stages)
        return [n] * self.num_stages
