"""Stage by stage against torchvision: the backbone + FPN and the RPN head, forward and forward +
backward, ours and torchvision's on the same canvas, batch and threads, alternated.

Where `bench/benchmark_training.py --torchvision` compares whole steps, this says whether a gap
is in the convolution stacks themselves (the same work on both sides) or elsewhere (the sampled
heads, the targets, the scheduling of the whole program). Random weights and inputs; batch 1;
float32; our convolutions with the config's kernel gradients ('auto' = 'matmul' on the CPU).

  $TORCH_VENV/bin/python bench/stages_torchvision.py --image_size 832 1344 --threads 2

Stages (each its own jitted program on our side):
  backbone_fpn / backbone_fpn_fwd_bwd: the ResNet-50 + FPN forward, and the gradient of the sum
    of the FPN outputs w.r.t. the trainable parameters (conv1 + layer1 frozen on both sides;
    ours stops the gradient there as `configs/coco_r50.py` does).
  rpn_head / rpn_head_fwd_bwd: the shared 3x3 conv + the objectness and box-delta 1x1 convs on
    P2-P6-shaped random features, and the gradient of sum(scores) + sum(deltas^2) w.r.t. the
    head's parameters and the features (what the FPN's backward needs).
Times are medians over ``--rounds`` of two calls each, after one warm-up; ratio = torchvision
time / ours (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import torchvision_runner  # bench/, on sys.path; first: it sets torch's OpenMP wait policy

import torch  # pylint: disable=wrong-import-order

from maskrcnn_jax import huge_pages, modeling
from maskrcnn_jax.configs import load_config
from maskrcnn_jax.modeling.model import MaskRCNN
from maskrcnn_jax.train import experiment

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'coco_r50.py')


def _ours(cfg, h: int, w: int):
  """Our stage functions (name -> no-argument callable that waits for its result)."""
  model = experiment.build_model(cfg)
  variables = modeling.init_variables(model, jax.random.PRNGKey(0), (h, w))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((1, h, w, 3)), jnp.float32)
  features = jax.jit(lambda v, x: model.apply(v, x, True, method=MaskRCNN.features))
  feats = features(variables, images)

  def features_loss(params, x):
    f = model.apply({**variables, 'params': params}, x, True, method=MaskRCNN.features)
    return sum(jnp.sum(t) for t in f.values())

  def head(params, f):
    return model.apply({**variables, 'params': params}, f,
                       method=lambda m, f: m.rpn_head(f))

  def head_loss(params, f):
    scores, deltas = head(params, f)
    return (sum(jnp.sum(t) for t in scores.values())
            + sum(jnp.sum(t * t) for t in deltas.values()))

  params = variables['params']
  backbone_grad = jax.jit(jax.grad(features_loss))
  head_fwd = jax.jit(head)
  head_grad = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
  wait = jax.block_until_ready
  return feats, {
      'backbone_fpn': lambda: wait(features(variables, images)),
      'backbone_fpn_fwd_bwd': lambda: wait(backbone_grad(params, images)),
      'rpn_head': lambda: wait(head_fwd(params, feats)),
      'rpn_head_fwd_bwd': lambda: wait(head_grad(params, feats)),
  }


def _torchvision(cfg, h: int, w: int, feats):
  """torchvision's stage functions on the same shapes (features: ours, transposed to NCHW)."""
  model = torchvision_runner.build_torchvision_model(cfg).train()
  images = torch.randn(1, 3, h, w)
  backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
  head = model.rpn.head
  head_params = list(head.parameters())
  tfeats = [torch.from_numpy(np.asarray(feats[k]).transpose(0, 3, 1, 2).copy()).requires_grad_()
            for k in sorted(feats)]

  def backbone_fwd():
    with torch.no_grad():
      return model.backbone(images)

  def backbone_grad():
    out = model.backbone(images)
    return torch.autograd.grad(sum(t.sum() for t in out.values()), backbone_params)

  def head_fwd():
    with torch.no_grad():
      return head(tfeats)

  def head_grad():
    scores, deltas = head(tfeats)
    loss = sum(t.sum() for t in scores) + sum((t * t).sum() for t in deltas)
    return torch.autograd.grad(loss, head_params + tfeats)

  return {'backbone_fpn': backbone_fwd, 'backbone_fpn_fwd_bwd': backbone_grad,
          'rpn_head': head_fwd, 'rpn_head_fwd_bwd': head_grad}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default=CONFIG)
  parser.add_argument('--image_size', type=int, nargs=2, default=(512, 512))
  parser.add_argument('--threads', type=int, default=None, help='torch threads (default: all)')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--json', default=None, help='write the result here')
  args = parser.parse_args()
  h, w = args.image_size
  if args.threads:
    torch.set_num_threads(args.threads)
  cfg = load_config(args.config)
  cfg.data.image_size = (h, w)
  feats, ours = _ours(cfg, h, w)
  theirs = _torchvision(cfg, h, w, feats)
  for fn in (*ours.values(), *theirs.values()):
    fn()  # compile / warm up
  times = {side: {name: [] for name in ours} for side in ('ours', 'torchvision')}
  for _ in range(args.rounds):
    for name in ours:
      for side, fns in (('ours', ours), ('torchvision', theirs)):
        t0 = time.perf_counter()
        fns[name]()
        fns[name]()
        times[side][name].append((time.perf_counter() - t0) / 2 * 1e3)
  result = {'image_size': [h, w], 'threads': torch.get_num_threads(), 'rounds': args.rounds,
            'jax_version': jax.__version__, 'torch_version': torch.__version__,
            'load_average': list(os.getloadavg()), 'stages': {}}
  for name in ours:
    o = statistics.median(times['ours'][name])
    t = statistics.median(times['torchvision'][name])
    result['stages'][name] = {'ours_ms': round(o, 1), 'torchvision_ms': round(t, 1),
                              'ratio_ours_over_torchvision': round(t / o, 3)}
    print(f'{name:22s} ours {o:8.1f} ms  torchvision {t:8.1f} ms  ratio {t / o:.2f}')
  print(f"load average {result['load_average']}")
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  huge_pages.restart_with_huge_pages()
  main()
