"""Import torchvision state dicts (ResNet ImageNet backbones, ``maskrcnn_resnet50_fpn``) as flax
variables of :mod:`maskrcnn_jax.modeling`.

The mapping is driven by the flax variable tree: every leaf of the target model is looked up under
the torchvision name its module path translates to, transformed to the flax layout and checked
for shape; torchvision keys left over are reported as unexpected. Layout changes:

* conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O); linear weight (O, I) -> kernel (I, O);
* ``box_head.fc6``: its input rows are torchvision's flattened (C, S, S) RoI features; ours are
  (S, S, C), so the rows are permuted;
* ``ConvTranspose2d`` weight (I, O, 2, 2) -> (2, 2, I, O) (see ``modeling.layers.Deconv2x2``);
* batch norm ``weight, bias, running_mean, running_var`` -> ``scale, bias, mean, var`` (all in
  ``batch_stats`` for frozen batch norm, ``scale``/``bias`` in ``params`` otherwise);
  ``num_batches_tracked`` is ignored.

Both the current torchvision names (``inner_blocks.0.0``, ``rpn.head.conv.0.0``,
``mask_head.0.0``) and the names of checkpoints saved by older versions (``inner_blocks.0``,
``rpn.head.conv``, ``mask_head.mask_fcn1``) are accepted.

Other classes: a state dict trained with another number of classes (e.g. torchvision's 91 COCO
classes into a model of ``num_classes`` = 4) fills everything but the class-dependent layers
``roi_heads.box_predictor.cls_score``, ``roi_heads.box_predictor.bbox_pred`` and
``roi_heads.mask_predictor.mask_fcn_logits``, which keep the target's fresh initialisation (one
log line per tensor, source shape -> target shape; the rule is
:func:`maskrcnn_jax.weights.transfer.plan_transfer`). Every other mismatch raises.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.modeling.resnet import ResNet
from maskrcnn_jax.weights import transfer
from maskrcnn_jax.weights.transfer import WeightImportError

StateDict = Mapping[str, np.ndarray]


_BN_LEAVES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))


def _dense_kernel(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (1, 0))


def _deconv_kernel(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 0, 1))


def _fc6_kernel(pooler_size: int) -> Callable[[np.ndarray], np.ndarray]:
  def transform(w: np.ndarray) -> np.ndarray:
    out, flat = w.shape
    channels = flat // (pooler_size * pooler_size)
    w = w.reshape(out, channels, pooler_size, pooler_size)
    return np.transpose(w, (2, 3, 1, 0)).reshape(flat, out)
  return transform


def _backbone_module(path: tuple[str, ...]) -> str:
  """('layer1', 'block0', 'downsample_conv') -> 'layer1.0.downsample.0'."""
  parts = []
  for p in path:
    if p.startswith('block'):
      parts.append(p[len('block'):])
    elif p == 'downsample_conv':
      parts.append('downsample.0')
    elif p == 'downsample_bn':
      parts.append('downsample.1')
    else:
      parts.append(p)
  return '.'.join(parts)


def _maskrcnn_candidates(path: tuple[str, ...], min_level: int) -> list[str]:
  """Candidate torchvision module names (current first) for a flax module path of MaskRCNN."""
  head, rest = path[0], path[1:]
  if head == 'backbone':
    return ['backbone.body.' + _backbone_module(rest)]
  if head == 'fpn':
    kind, level = re.fullmatch(r'(lateral|output)_p(\d+)', rest[0]).groups()
    block = 'inner_blocks' if kind == 'lateral' else 'layer_blocks'
    i = int(level) - min_level
    return [f'backbone.fpn.{block}.{i}.0', f'backbone.fpn.{block}.{i}']
  if head == 'rpn_head':
    return {'conv': ['rpn.head.conv.0.0', 'rpn.head.conv'],
            'objectness': ['rpn.head.cls_logits'],
            'deltas': ['rpn.head.bbox_pred']}[rest[0]]
  if head == 'box_head':
    return {'fc6': ['roi_heads.box_head.fc6'], 'fc7': ['roi_heads.box_head.fc7'],
            'class_logits': ['roi_heads.box_predictor.cls_score'],
            'box_deltas': ['roi_heads.box_predictor.bbox_pred']}[rest[0]]
  if head == 'mask_head':
    name = rest[0]
    if name.startswith('mask_fcn'):
      i = int(name[len('mask_fcn'):])
      return [f'roi_heads.mask_head.{i - 1}.0', f'roi_heads.mask_head.mask_fcn{i}']
    return {'deconv': ['roi_heads.mask_predictor.conv5_mask'],
            'mask_logits': ['roi_heads.mask_predictor.mask_fcn_logits']}[name]
  raise WeightImportError(f'no torchvision name for module {"/".join(path)}')


def _transform_for(module: str, leaf: str, pooler_size: int):
  """Layout change of one leaf: only kernels change layout; biases and batch norm do not."""
  if leaf != 'kernel':
    return lambda w: w
  if module == 'deconv':
    return _deconv_kernel
  if module == 'fc6':
    return _fc6_kernel(pooler_size)
  if module in ('fc7', 'class_logits', 'box_deltas'):
    return _dense_kernel
  return _conv_kernel


def _convert(target: Mapping[str, Any], state_dict: StateDict,
             candidates: Callable[[tuple[str, ...]], list[str]],
             pooler_size: int, ignored: Callable[[str], bool]) -> dict:
  """Fills the ``target`` variables from ``state_dict``; raises on any mismatch except the
  class-dependent layers of a source with another class count, which keep ``target``'s values
  (so ``target`` must then hold values, not abstract shapes)."""
  state = {k: np.asarray(v) for k, v in state_dict.items()}
  used: set[str] = set()
  missing = []
  comparisons: list[transfer.Comparison] = []
  values: dict[tuple[str, ...], np.ndarray] = {}
  targets: dict[tuple[str, ...], Any] = {}
  torch_shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
  for key_path, abstract in jax.tree_util.tree_flatten_with_path(target)[0]:
    names = tuple(k.key for k in key_path)
    module_path, leaf = names[1:-1], names[-1]
    # kernel -> weight; batch norm scale/mean/var -> weight/running_mean/running_var.
    torch_leaf = 'weight' if leaf == 'kernel' else _BN_LEAVES[leaf]
    options = [f'{m}.{torch_leaf}' for m in candidates(module_path)]
    found = next((k for k in options if k in state), None)
    if found is None:
      missing.append(options[0])
      continue
    used.add(found)
    value = _transform_for(module_path[-1], leaf, pooler_size)(state[found])
    values[names], targets[names] = value, abstract
    torch_shapes[names] = tuple(state[found].shape)
    comparisons.append(transfer.Comparison(names, found, tuple(value.shape),
                                           tuple(abstract.shape)))
  skipped, errors = transfer.plan_transfer(comparisons)
  unexpected = sorted(k for k in state if k not in used and not ignored(k))
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing keys: {missing[:20]}')
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected keys: {unexpected[:20]}')
  if errors:
    mismatched = [f'{c.label}: torchvision {torch_shapes[c.path]} -> {c.source_shape}, model '
                  f'{"/".join(c.path)} expects {c.target_shape}' for c in errors]
    problems.append(f'{len(mismatched)} shape mismatches: {mismatched[:20]}')
  abstract_skips = [c for c in skipped if isinstance(targets[c.path], jax.ShapeDtypeStruct)]
  if abstract_skips:
    problems.append(
        f'the class-dependent layers have another class count ({abstract_skips[0].label}: '
        f'{abstract_skips[0].source_shape} vs {abstract_skips[0].target_shape}); pass fresh '
        f'variables, not abstract shapes, as the target to keep them freshly initialised')
  if problems:
    raise WeightImportError('state dict does not fit the model: ' + '; '.join(problems))
  transfer.log_skipped(skipped)
  keep = {c.path for c in skipped}
  out: dict = {}
  for names, value in values.items():
    node = out
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = np.asarray(targets[names] if names in keep else value, np.float32)
  return out


def resnet_from_torchvision(state_dict: StateDict, depth: int, finetune_bn: bool = False,
                            prefix: str = '') -> dict:
  """Variables of :class:`maskrcnn_jax.modeling.ResNet` from a torchvision ``resnet{depth}``
  state dict (ImageNet classification; ``fc`` is dropped).

  Args:
    state_dict: torchvision names -> NumPy arrays (see :func:`load_state_dict`).
    depth: 18, 34, 50 or 101.
    finetune_bn: layout for trainable batch norm (``scale``/``bias`` in ``params``).
    prefix: prefix of the backbone keys (e.g. ``'backbone.body.'``); keys without it are ignored.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` nested dicts of float32 NumPy arrays: put them
    under ``'backbone'`` of a whole model's variables.
  """
  model = ResNet(depth, finetune_bn=finetune_bn)
  target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  ignored = lambda k: k.endswith('num_batches_tracked') or k.split('.')[0] == 'fc'
  return _convert(target, sub, lambda path: [_backbone_module(path)], 0, ignored)


def from_torchvision(state_dict: StateDict, target: Mapping[str, Any], *, pooler_size: int,
                     min_level: int) -> dict:
  """Variables of a Mask R-CNN from a torchvision Mask R-CNN state dict
  (``maskrcnn_resnet50_fpn``; ``configs/torchvision_r50.py`` is its exact architecture).

  Args:
    state_dict: torchvision names -> NumPy arrays (see :func:`load_state_dict`).
    target: the model's variables or their abstract shapes (``jax.eval_shape`` of
      :func:`maskrcnn_jax.modeling.init_variables`): the layout to fill.
    pooler_size: the box head's RoI size (config.model.roi.pooler_size; torchvision flattens the
      pooled features channel-major).
    min_level: the finest pyramid level (config.model.min_level).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` nested dicts of float32 NumPy arrays. When the state
    dict has another number of classes than ``target`` (torchvision's 91 into a 4-class model),
    ``cls_score``, ``bbox_pred`` and ``mask_fcn_logits`` are not loaded: their leaves are
    ``target``'s (which must then be fresh variables, not abstract shapes), one line each logged.

  Raises:
    WeightImportError: naming missing keys, unexpected keys and shape mismatches.
  """
  ignored = lambda k: k.endswith('num_batches_tracked')
  return _convert(target, state_dict, lambda p: _maskrcnn_candidates(p, min_level), pooler_size,
                  ignored)


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a state dict file into ``{name: np.ndarray}``; nothing is downloaded.

  ``.npz`` (NumPy), ``.safetensors`` (needs the ``safetensors`` package) or ``.pth`` / ``.pt``
  (needs torch; read with ``torch.load(weights_only=True)``, so no pickled code runs).
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if not path.is_file():
    raise FileNotFoundError(f'no weights file at {path}')
  if suffix == '.npz':
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  if suffix == '.safetensors':
    try:
      # Optional dependency, only for .safetensors files.
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'reading {path} needs the safetensors package') from e
    return dict(load_file(str(path)))
  if suffix in ('.pth', '.pt'):
    try:
      import torch  # pylint: disable=g-import-not-at-top  # torch boundary: .pth files only
    except ImportError as e:
      raise ImportError(f'reading {path} needs torch; convert it to .npz or .safetensors '
                        'where torch is installed') from e
    obj = torch.load(str(path), map_location='cpu', weights_only=True)
    for key in ('model', 'state_dict'):  # common checkpoint wrappers
      if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
        obj = obj[key]
    return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
            for k, v in obj.items() if hasattr(v, 'numpy')}
  raise ValueError(f'unsupported weights file {path}: use .npz, .safetensors or .pth')


def load_pretrained(variables: dict, *, maskrcnn_path: str = '', backbone_path: str = '',
                    backbone_prefix: str = '', depth: int, finetune_bn: bool, pooler_size: int,
                    min_level: int) -> dict:
  """Freshly initialised model variables with torchvision weights put in.

  Args:
    variables: ``{'params', 'batch_stats'}`` of the model (fresh init).
    maskrcnn_path: a whole ``maskrcnn_resnet50_fpn`` state dict file (replaces every variable;
      with another number of classes than the model, all but the class-dependent layers, see
      :func:`from_torchvision`).
    backbone_path: an ImageNet ``resnet{depth}`` state dict file (replaces the backbone only; the
      FPN and heads keep their initialisation). Ignored when ``maskrcnn_path`` is given.
    backbone_prefix: prefix of the backbone keys in ``backbone_path`` (e.g. ``'backbone.body.'``
      to take the backbone of a detection checkpoint).
    depth, finetune_bn: the model's ResNet (config.model.backbone).
    pooler_size, min_level: as :func:`from_torchvision`.

  Returns:
    Variables of the same structure, shapes and dtypes as ``variables``.

  Raises:
    WeightImportError: the file does not fit the model (the message names the keys).
  """
  if maskrcnn_path:
    imported = from_torchvision(load_state_dict(maskrcnn_path), variables,
                                pooler_size=pooler_size, min_level=min_level)
  elif backbone_path:
    backbone = resnet_from_torchvision(load_state_dict(backbone_path), depth,
                                       finetune_bn=finetune_bn, prefix=backbone_prefix)
    imported = {collection: dict(tree) for collection, tree in variables.items()}
    for collection, tree in backbone.items():
      imported.setdefault(collection, {})['backbone'] = tree
  else:
    return variables
  expected = jax.tree_util.tree_structure(variables)
  if jax.tree_util.tree_structure(imported) != expected:
    raise WeightImportError(f'weights from {maskrcnn_path or backbone_path} do not have the '
                            f'variable layout of the configured model')
  return jax.tree_util.tree_map(lambda new, old: jnp.asarray(new, old.dtype).reshape(old.shape),
                                imported, variables)
