"""CIFAR-style ResNets (He et al. 2016, section 4.2) as Hugging Face ``PreTrainedModel``s.

Layout (the sub-network engine relies on it): ``model.resnet.stages[i].layers`` is an
``nn.Sequential`` of :class:`CifarResNetBasicBlock`; :meth:`CifarResNetStage.forward` iterates that
container, so temporarily replacing its ``_modules`` with a subset of the blocks runs a shallower
network. A block may be skipped only when its ``shortcut`` is ``nn.Identity`` (input and output
shapes match); the first block of every stage after the first changes the shape.

Self-contained (torch, transformers and the configuration file beside it): ``save_pretrained``
copies both files beside the weights, so the folder loads with ``trust_remote_code=True`` where
stim_hf is not installed.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

from .configuration_cifar_resnet import CifarResNetConfig

__all__ = [
    "CifarResNetBasicBlock",
    "CifarResNetForImageClassification",
    "CifarResNetModel",
    "CifarResNetPaddingShortcut",
    "CifarResNetPreTrainedModel",
    "CifarResNetStage",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a batch norm follows)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class CifarResNetPaddingShortcut(nn.Module):
    """Parameter-free shortcut (option A): subsample spatially by ``stride``, zero-pad the channels.

    The extra ``out_channels - in_channels`` zero channels are split between both sides, as in the
    common reproduction of the paper's CIFAR models.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        """Create the shortcut; needs ``out_channels >= in_channels``."""
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"padding shortcut cannot reduce channels ({in_channels} -> {out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """Subsample ``x`` and pad it with zero channels to ``out_channels``."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            front = extra // 2
            x = F.pad(x, (0, 0, 0, 0, front, extra - front))
        return x

    def extra_repr(self) -> str:
        """Channels and stride, for ``print(model)``."""
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class CifarResNetBasicBlock(nn.Module):
    """Basic residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``shortcut`` is ``nn.Identity`` when the block keeps the shape of its input (such a block may be
    skipped); otherwise a 1x1 convolution + batch norm (``"projection"``) or a
    :class:`CifarResNetPaddingShortcut` (``"padding"``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "projection"):
        """Create the block; ``stride`` applies to the first convolution and the shortcut."""
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "projection":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        elif shortcut == "padding":
            self.shortcut = CifarResNetPaddingShortcut(in_channels, out_channels, stride)
        else:
            raise ValueError(f"shortcut={shortcut!r} is invalid (valid: 'projection', 'padding')")

    @property
    def has_identity_shortcut(self) -> bool:
        """Whether input and output shapes match, i.e. the block may be skipped."""
        return isinstance(self.shortcut, nn.Identity)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class CifarResNetStage(nn.Module):
    """A stage: ``layers`` (an ``nn.Sequential`` of basic blocks), the first one possibly strided.

    :meth:`forward` iterates ``self.layers``, so swapping ``self.layers._modules`` for a subset of
    the blocks runs the stage with those blocks only.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, stride: int, shortcut: str) -> None:
        """Create ``num_blocks`` blocks; only the first changes channels / resolution."""
        super().__init__()
        blocks = [CifarResNetBasicBlock(in_channels, out_channels, stride, shortcut)]
        blocks += [CifarResNetBasicBlock(out_channels, out_channels, 1, shortcut) for _ in range(num_blocks - 1)]
        self.layers = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """Run the blocks currently in ``self.layers``, in order."""
        for block in self.layers:
            x = block(x)
        return x


class CifarResNetPreTrainedModel(PreTrainedModel):
    """Base class: config class, weight initialisation, and loading/saving through ``PreTrainedModel``.

    Initialisation: Kaiming normal (fan_out, ReLU) for convolutions, weight 1 / bias 0 for batch
    norms (running statistics reset), PyTorch's default for the linear classifier.
    """

    config_class = CifarResNetConfig
    config: CifarResNetConfig
    base_model_prefix = "resnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["CifarResNetBasicBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise one module. Uses ``transformers.initialization``, which skips loaded tensors."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            # PyTorch's own nn.Linear.reset_parameters, through the loading-aware helpers.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(module.weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if module.running_mean is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
            if getattr(module, "num_batches_tracked", None) is not None:
                init.zeros_(module.num_batches_tracked)


class CifarResNetModel(CifarResNetPreTrainedModel):
    """The CIFAR ResNet trunk: stem (3x3 conv + BN + ReLU), ``stages``, global average pooling.

    ``last_hidden_state`` is the last stage's feature map ``(B, widths[-1], H', W')``;
    ``pooler_output`` its spatial mean ``(B, widths[-1])``; ``hidden_states`` (on request) the stem
    output followed by each stage's output.
    """

    def __init__(self, config: CifarResNetConfig) -> None:
        """Build the trunk from ``config``."""
        super().__init__(config)
        widths = config.widths
        self.stem = nn.Sequential(
            OrderedDict(
                conv=_conv3x3(config.num_channels, widths[0]),
                bn=nn.BatchNorm2d(widths[0]),
                act=nn.ReLU(inplace=True),
            )
        )
        stages = []
        in_channels = widths[0]
        for i, (width, num_blocks) in enumerate(zip(widths, config.stage_depths, strict=True)):
            stages.append(CifarResNetStage(in_channels, width, num_blocks, 1 if i == 0 else 2, config.shortcut))
            in_channels = width
        self.stages = nn.ModuleList(stages)
        self.pooler = nn.AdaptiveAvgPool2d(1)
        self.post_init()

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple[Tensor, ...]:
        """Encode ``pixel_values`` ``(B, num_channels, H, W)``; any ``H, W >= 1`` works.

        With ``config.resize_input_to`` set, the batch is first resized to that height (bilinear, no
        antialiasing, as stimulative training resizes a sub-network's inputs).
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict

        size = self.config.resize_input_to
        # int(): under torch.onnx.export(dynamo=False) (TorchScript tracing) the sizes are 0-d tensors, which round()
        # refuses; as ints the arithmetic is today's exactly (banker's rounding included), and the exported graph
        # keeps its spatial size fixed either way (only the batch is dynamic).
        if size is not None:
            height, width = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
            if height != size:
                new_width = max(1, round(width * size / height))
                pixel_values = F.interpolate(pixel_values, size=(size, new_width), mode="bilinear", align_corners=False)
        hidden = self.stem(pixel_values)
        all_hidden: tuple[Tensor, ...] | None = (hidden,) if output_hidden_states else None
        for stage in self.stages:
            hidden = stage(hidden)
            if all_hidden is not None:
                all_hidden = all_hidden + (hidden,)
        pooled = self.pooler(hidden).flatten(1)

        if not return_dict:
            out: tuple[Tensor, ...] = (hidden, pooled)
            return out + (all_hidden,) if all_hidden is not None else out
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=hidden, pooler_output=pooled, hidden_states=all_hidden
        )


class CifarResNetForImageClassification(CifarResNetPreTrainedModel):
    """CIFAR ResNet with a linear classifier on the pooled features; cross-entropy loss on ``labels``.

    ``forward`` takes no ``**kwargs`` and ``accepts_loss_kwargs`` is False: the returned loss is a
    plain batch mean, so the ``Trainer`` scales it for gradient accumulation itself.
    """

    accepts_loss_kwargs = False

    def __init__(self, config: CifarResNetConfig) -> None:
        """Build the trunk (``self.resnet``) and the classifier (``self.classifier``)."""
        super().__init__(config)
        self.num_labels = config.num_labels
        self.resnet = CifarResNetModel(config)
        self.classifier = nn.Linear(config.widths[-1], config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutputWithNoAttention | tuple[Tensor, ...]:
        """Classify ``pixel_values``; with ``labels`` ``(B,)`` also return the mean cross-entropy."""
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        if return_dict is None:
            return_dict = self.config.return_dict

        outputs = self.resnet(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = F.cross_entropy(logits, labels) if labels is not None else None

        if not return_dict:
            out: tuple[Tensor, ...] = (logits,)
            if outputs.hidden_states is not None:
                out = out + (outputs.hidden_states,)
            return (loss,) + out if loss is not None else out
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
