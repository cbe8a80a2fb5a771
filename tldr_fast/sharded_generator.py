"""The generator on one rank's slice of each generator's batch, computing exactly the single
process's images for that slice.

Two of the generator's layers couple the images of a batch, and are replaced in a copy of the
template (`shard_generator`; parameter names unchanged, so the stacked parameters apply as they
are):

- BatchNorm (batch statistics, no running buffers) -> `GlobalBatchNorm2d`: with n the global
  count of values per channel, mu = (sum over ranks of sum_local x) / n and
  var = (sum over ranks of sum_local (x - mu)^2) / n, the biased variance nn.BatchNorm2d
  normalises with in training (the two-pass form: no cancellation in E[x^2] - mu^2). The sums
  cross ranks through `sum_over_ranks`, an all-reduce whose backward is the all-reduce of the
  cotangent (SyncBatchNorm's rule): rank r then receives
  (sum_r' dL_r'/dmu) . dmu_r/dtheta, and the sum over ranks of the ranks' gradients is the
  single-process gradient, cross terms between ranks included.
- Dropout -> `SliceOfGlobalDropout`: every rank draws the mask of the whole global batch as the
  single process draws it (same shape, same memory layout, same RNG stream, so every rank's RNG
  state stays the single process's) and applies its own rows. The draw is replicated, the
  multiply is not.

Per step and rank this adds, per BatchNorm layer, two all-reduces of K C numbers in the forward
pass and two in the backward pass.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed._functional_collectives as functional
import torch.nn.functional as F
from torch import nn

from tldr_fast.models.generator import Generator, UniformMaskDropout, dropout_mask


class _SumOverRanks(torch.autograd.Function):
    """y = sum over ranks of x; dx = sum over ranks of dy. Usable under torch.func's grad, vjp and
    vmap (a batched input is reduced as one tensor, its batch dimension first)."""

    @staticmethod
    def forward(x, group):
        return functional.wait_tensor(functional.all_reduce(x.contiguous(), "sum", group))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return _SumOverRanks.apply(grad, ctx.group), None

    @staticmethod
    def vmap(info, in_dims, x, group):
        if in_dims[0] is None:
            return _SumOverRanks.apply(x, group), None
        return _SumOverRanks.apply(x.movedim(in_dims[0], 0), group), 0


# Dynamo would inline the function's forward under the torch.func transforms, where the functional
# all-reduce meets batched tensors and fails; kept whole, AOTAutograd traces it like eager.
torch.compiler.allow_in_graph(_SumOverRanks)


def sum_over_ranks(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-reduce (sum) of x over the ranks of group."""
    return _SumOverRanks.apply(x, group)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """Training-mode BatchNorm2d of the rank's images with the statistics of the global batch of
    `global_batch` images per generator (see the module docstring). Keeps nn.BatchNorm2d's
    parameters (weight, bias) and eps; holds no running statistics."""

    def __init__(self, source: nn.BatchNorm2d, global_batch: int, group):
        if source.track_running_stats or not source.affine:
            raise ValueError(
                "the generator's BatchNorm must be affine with track_running_stats=False, got "
                f"affine={source.affine}, track_running_stats={source.track_running_stats}"
            )
        super().__init__(
            source.num_features,
            eps=source.eps,
            affine=True,
            track_running_stats=False,
            device="meta",
        )
        self.global_batch = global_batch
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = self.global_batch * x.shape[-2] * x.shape[-1]
        mean = sum_over_ranks(x.sum((0, 2, 3)), self.group) / count
        centred = x - mean.view(-1, 1, 1)
        var = sum_over_ranks(centred.square().sum((0, 2, 3)), self.group) / count
        scale = self.weight * torch.rsqrt(var + self.eps)
        return centred * scale.view(-1, 1, 1) + self.bias.view(-1, 1, 1)


class SliceOfGlobalDropout(nn.Module):
    """The rows start:stop of the single process's dropout of a global batch of `global_batch`
    images: the whole batch's mask is drawn, this rank's rows are applied."""

    def __init__(self, source: nn.Dropout, global_batch: int, start: int, stop: int):
        super().__init__()
        self.p = source.p
        self.uniform_mask_on_cpu = isinstance(source, UniformMaskDropout)
        self.global_batch, self.start, self.stop = global_batch, start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        rest = x.shape[1:]
        zeros = (x.new_zeros(self.start, *rest), x.new_zeros(self.global_batch - self.stop, *rest))
        # The single process draws its mask like its dropout input, whose memory layout (the order
        # the draw fills) the BatchNorm before it sets under vmap: the generator's dropout always
        # follows BatchNorm and LeakyReLU, which keeps the layout. A batch_norm of a batch of the
        # global shape, batched like x, has that layout, so its draw is the single process's.
        like = F.batch_norm(torch.cat([zeros[0], x, zeros[1]]), None, None, training=True)
        if self.uniform_mask_on_cpu and x.device.type == "cpu":
            mask = dropout_mask(torch.empty_like(like).uniform_(), self.p)
        else:  # nn.Dropout's kernel, whose numbers follow the layout the same way
            mask = F.dropout(torch.ones_like(like), self.p, training=True)
        return x * mask[self.start : self.stop]


def shard_generator(template: Generator, shard) -> Generator:
    """A copy of the (meta) template computing the images shard.start:shard.stop of each
    generator's batch of sum(shard.batch_sizes) images, as the single process computes them."""
    global_batch = sum(shard.batch_sizes)
    sharded = copy.deepcopy(template)
    for parent in list(sharded.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, GlobalBatchNorm2d(child, global_batch, shard.group))
            elif isinstance(child, nn.Dropout):
                setattr(
                    parent,
                    name,
                    SliceOfGlobalDropout(child, global_batch, shard.start, shard.stop),
                )
    return sharded
