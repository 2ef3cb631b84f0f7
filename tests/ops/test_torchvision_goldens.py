"""Checks the detection ops against committed torchvision golden outputs.

The goldens live in ``tests/ops/goldens/torchvision_ops.npz`` and are produced by
``tools/make_ops_goldens.py`` (see its docstring for every key and layout); regenerate them with
``$TORCH_VENV/bin/python tools/make_ops_goldens.py``. This module needs no torch.

Every float comparison is a max-abs-error check at 1e-4 (float32). NMS results must match
torchvision's kept indices exactly (the goldens are drawn so that no suppression decision is
within 1e-4 of the threshold, and scores have no ties).
"""

from __future__ import annotations

import functools
import importlib
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

GOLDENS = pathlib.Path(__file__).parent / 'goldens' / 'torchvision_ops.npz'
REGENERATE = '$TORCH_VENV/bin/python tools/make_ops_goldens.py'
ATOL = 1e-4

BOX_IOU_CASES = ('random', 'degenerate')
BOX_CODER_CASES = ('w10_10_5_5', 'w1_1_1_1')
NMS_CASES = ('clustered_t0.5', 'clustered_t0.7', 'identical', 'distinct_scores',
             'proposals_2000_t0.7', 'zero_area')
BATCHED_NMS_CASES = ('clustered_4classes_t0.5',)
# max_output_size relative to torchvision's kept count K: 'larger' = K + 7 (padding, every case)
# or 'smaller' = K // 2 (truncation; on a subset, since each (N, max_output_size) is a compile).
NMS_PARAMS = ([(case, 'larger') for case in NMS_CASES]
              + [(case, 'smaller') for case in ('clustered_t0.5', 'proposals_2000_t0.7')])
MAX_OUTPUT_MODES = ('larger', 'smaller')
ANCHOR_LEVELS = (2, 3, 4, 5, 6)


def roi_case_name(output_size, spatial_scale, sampling_ratio, aligned) -> str:
  """Key of one RoIAlign case, as written by tools/make_ops_goldens.py."""
  oh, ow = output_size
  return (f'o{oh}x{ow}_s{spatial_scale}_r{sampling_ratio}_'
          f"{'aligned' if aligned else 'unaligned'}")


ROI_SETTINGS = list(itertools.product(((7, 7), (5, 4)), (1.0, 0.5), (2, 1), (True, False)))
ROI_CASES = [roi_case_name(*s) for s in ROI_SETTINGS]
ROI_ADAPTIVE_CASES = [roi_case_name((7, 7), 0.5, -1, True)]


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def goldens() -> dict[str, np.ndarray]:
  """All golden arrays, keyed as in the npz (loaded once per module)."""
  if not GOLDENS.is_file():
    pytest.fail(f'golden file missing: {GOLDENS}; regenerate it from the repository root with '
                f'`{REGENERATE}` (needs torch + torchvision in a separate venv)')
  with np.load(GOLDENS) as data:
    return {k: data[k] for k in data.files}


def _import(name: str):
  """Imports an ops module; a missing module is a test error, never a skip."""
  return importlib.import_module(f'maskrcnn_jax.ops.{name}')


@pytest.fixture(scope='module')
def boxes_ops():
  return _import('boxes')


@pytest.fixture(scope='module')
def nms_ops():
  return _import('nms')


@pytest.fixture(scope='module')
def roi_ops():
  return _import('roi_align')


@pytest.fixture(scope='module')
def anchor_ops():
  return _import('anchors')


def assert_close(actual, expected, what: str, atol: float = ATOL) -> None:
  """Asserts equal shapes and max |actual - expected| <= atol, naming the worst element."""
  actual = np.asarray(actual, dtype=np.float64)
  expected = np.asarray(expected, dtype=np.float64)
  assert actual.shape == expected.shape, f'{what}: shape {actual.shape} != {expected.shape}'
  if actual.size == 0:
    return
  bad = np.argwhere(~np.isfinite(actual))
  assert not len(bad), f'{what}: non-finite values at {bad[:5].tolist()}'
  err = np.abs(actual - expected)
  worst = np.unravel_index(np.argmax(err), err.shape)
  assert err.max() <= atol, (
      f'{what}: max abs error {err.max():.3g} > {atol:g} at index {tuple(int(i) for i in worst)} '
      f'(ours {actual[worst]:.6g}, torchvision {expected[worst]:.6g}); '
      f'{int((err > atol).sum())} of {err.size} elements off')


def _threshold(x) -> float:
  """The IoU threshold passed to torchvision (stored as float32, e.g. 0.7 -> 0.699999988)."""
  return round(float(x), 6)


def _max_output_size(num_kept: int, mode: str) -> int:
  return num_kept + 7 if mode == 'larger' else max(1, num_kept // 2)


def _check_nms_result(result, keep: np.ndarray, max_output_size: int, what: str) -> None:
  """Checks nms' (indices, valid) against torchvision's ``keep[:max_output_size]``."""
  indices, valid = (np.asarray(r) for r in result)
  assert indices.shape == (max_output_size,), f'{what}: indices shape {indices.shape}'
  assert valid.shape == (max_output_size,), f'{what}: valid shape {valid.shape}'
  assert indices.dtype == np.int32, f'{what}: indices dtype {indices.dtype}'
  assert valid.dtype == np.bool_, f'{what}: valid dtype {valid.dtype}'
  expected = keep[:max_output_size]
  ours = indices[valid]
  if not np.array_equal(ours, expected):
    n = min(len(ours), len(expected))
    first = next((i for i in range(n) if ours[i] != expected[i]), n)
    pytest.fail(f'{what}: {len(ours)} valid indices vs {len(expected)} from torchvision; first '
                f'difference at position {first}: ours {ours[first:first + 5].tolist()}, '
                f'torchvision {expected[first:first + 5].tolist()}')


# ------------------------------------------------------------------------------------------------
# The golden file itself
# ------------------------------------------------------------------------------------------------

def test_golden_file_provenance_and_cases(goldens):
  """The npz records its versions and holds exactly the cases this module tests."""
  for key in ('meta/torch_version', 'meta/torchvision_version'):
    assert goldens[key].dtype.kind == 'U' and str(goldens[key]), key
  cases = {k.rsplit('/', 1)[0] for k in goldens
           if k.split('/')[0] in ('nms', 'batched_nms', 'roi_align', 'roi_align_adaptive',
                                  'box_iou', 'box_coder')}
  expected = ({f'nms/{c}' for c in NMS_CASES}
              | {f'batched_nms/{c}' for c in BATCHED_NMS_CASES}
              | {f'roi_align/{c}' for c in ROI_CASES}
              | {'roi_align', 'roi_align/cotangent'}
              | {f'roi_align_adaptive/{c}' for c in ROI_ADAPTIVE_CASES}
              | {f'box_iou/{c}' for c in BOX_IOU_CASES}
              | {f'box_coder/{c}' for c in BOX_CODER_CASES})
  assert cases == expected, (f'npz cases differ from this module: extra {cases - expected}, '
                            f'missing {expected - cases}')


# ------------------------------------------------------------------------------------------------
# boxes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('case', BOX_IOU_CASES)
def test_box_iou(goldens, boxes_ops, case):
  g = {k: goldens[f'box_iou/{case}/{k}'] for k in ('boxes1', 'boxes2', 'iou')}
  iou = jax.jit(boxes_ops.box_iou)(jnp.asarray(g['boxes1']), jnp.asarray(g['boxes2']))
  assert_close(iou, g['iou'], f'box_iou/{case}')


def test_box_area(goldens, boxes_ops):
  area = jax.jit(boxes_ops.box_area)(jnp.asarray(goldens['box_area/boxes']))
  assert_close(area, goldens['box_area/area'], 'box_area')


def test_clip_boxes(goldens, boxes_ops):
  height, width = (int(v) for v in goldens['clip_boxes/image_size'])
  clip = jax.jit(functools.partial(boxes_ops.clip_boxes, height=height, width=width))
  clipped = clip(jnp.asarray(goldens['clip_boxes/boxes']))
  assert_close(clipped, goldens['clip_boxes/clipped'], 'clip_boxes')


@pytest.mark.parametrize('case', BOX_CODER_CASES)
def test_encode_boxes(goldens, boxes_ops, case):
  g = {k: goldens[f'box_coder/{case}/{k}']
       for k in ('weights', 'encode_boxes', 'encode_anchors', 'encode_deltas')}
  encode = jax.jit(functools.partial(boxes_ops.encode_boxes,
                                     weights=tuple(float(w) for w in g['weights'])))
  deltas = encode(jnp.asarray(g['encode_boxes']), jnp.asarray(g['encode_anchors']))
  assert_close(deltas, g['encode_deltas'], f'encode_boxes/{case}')


@pytest.mark.parametrize('case', BOX_CODER_CASES)
def test_decode_boxes(goldens, boxes_ops, case):
  g = {k: goldens[f'box_coder/{case}/{k}']
       for k in ('weights', 'decode_deltas', 'decode_anchors', 'decoded')}
  decode = jax.jit(functools.partial(boxes_ops.decode_boxes,
                                     weights=tuple(float(w) for w in g['weights'])))
  boxes = decode(jnp.asarray(g['decode_deltas']), jnp.asarray(g['decode_anchors']))
  assert_close(boxes, g['decoded'], f'decode_boxes/{case}')


# ------------------------------------------------------------------------------------------------
# NMS
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('case,mode', NMS_PARAMS)
def test_nms(goldens, nms_ops, case, mode):
  g = {k: goldens[f'nms/{case}/{k}'] for k in ('boxes', 'scores', 'iou_threshold', 'keep')}
  max_output_size = _max_output_size(len(g['keep']), mode)
  fn = jax.jit(functools.partial(nms_ops.nms, iou_threshold=_threshold(g['iou_threshold']),
                                 max_output_size=max_output_size))
  result = fn(jnp.asarray(g['boxes']), jnp.asarray(g['scores']))
  _check_nms_result(result, g['keep'], max_output_size, f'nms/{case} (max {max_output_size})')


@pytest.mark.parametrize('mode', MAX_OUTPUT_MODES)
@pytest.mark.parametrize('case', BATCHED_NMS_CASES)
def test_batched_nms(goldens, nms_ops, case, mode):
  g = {k: goldens[f'batched_nms/{case}/{k}']
       for k in ('boxes', 'scores', 'classes', 'iou_threshold', 'keep')}
  max_output_size = _max_output_size(len(g['keep']), mode)
  fn = jax.jit(functools.partial(nms_ops.batched_nms,
                                 iou_threshold=_threshold(g['iou_threshold']),
                                 max_output_size=max_output_size))
  result = fn(jnp.asarray(g['boxes']), jnp.asarray(g['scores']),
              jnp.asarray(g['classes'].astype(np.int32)))
  _check_nms_result(result, g['keep'], max_output_size,
                    f'batched_nms/{case} (max {max_output_size})')


# ------------------------------------------------------------------------------------------------
# RoIAlign
# ------------------------------------------------------------------------------------------------

def _roi_params(g: dict[str, np.ndarray]) -> dict:
  return dict(output_size=tuple(int(v) for v in g['output_size']),
              spatial_scale=float(g['spatial_scale']),
              sampling_ratio=int(g['sampling_ratio']),
              aligned=bool(g['aligned']))


_ROI_RESULTS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _roi_forward_backward(goldens, roi_ops, prefix: str, case: str):
  """Runs our roi_align (jitted) and its VJP for one stored case, memoized per process.

  Returns:
    (output (B, N, oh, ow, C), grad_features (B, H, W, C)) as numpy arrays, where the gradient
    is d(sum(output * cotangent)) / d(features).
  """
  key = f'{prefix}/{case}'
  if key not in _ROI_RESULTS:
    g = {k[len(key) + 1:]: v for k, v in goldens.items() if k.startswith(key + '/')}
    params = _roi_params(g)
    oh, ow = params['output_size']
    cotangent = jnp.asarray(goldens[f'roi_align/cotangent/{oh}x{ow}'])

    @jax.jit
    def forward_backward(features, boxes, cot):
      out, vjp = jax.vjp(lambda f: roi_ops.roi_align(f, boxes, **params), features)
      (grad,) = vjp(cot)
      return out, grad

    out, grad = forward_backward(jnp.asarray(goldens['roi_align/features']),
                                 jnp.asarray(g['boxes']), cotangent)
    _ROI_RESULTS[key] = (np.asarray(out), np.asarray(grad))
  return _ROI_RESULTS[key]


@pytest.mark.parametrize('case', ROI_CASES)
def test_roi_align_forward(goldens, roi_ops, case):
  out, _ = _roi_forward_backward(goldens, roi_ops, 'roi_align', case)
  assert_close(out, goldens[f'roi_align/{case}/output'], f'roi_align/{case} output')


@pytest.mark.parametrize('case', ROI_CASES)
def test_roi_align_grad(goldens, roi_ops, case):
  _, grad = _roi_forward_backward(goldens, roi_ops, 'roi_align', case)
  assert_close(grad, goldens[f'roi_align/{case}/grad_features'],
               f'roi_align/{case} d(features)')


@pytest.mark.parametrize('case', ROI_ADAPTIVE_CASES)
def test_roi_align_adaptive_sampling(goldens, roi_ops, case):
  """sampling_ratio=-1 (ceil(roi_size / output_size) samples per bin, data dependent).

  Our op has static shapes and may reject it; then this case is skipped, not failed.
  """
  try:
    out, grad = _roi_forward_backward(goldens, roi_ops, 'roi_align_adaptive', case)
  except (ValueError, NotImplementedError, TypeError) as e:
    pytest.skip(f'roi_align does not support adaptive sampling (sampling_ratio=-1), which needs '
                f'data-dependent sample counts: {type(e).__name__}: {e}')
  assert_close(out, goldens[f'roi_align_adaptive/{case}/output'], f'roi_align_adaptive/{case}')
  assert_close(grad, goldens[f'roi_align_adaptive/{case}/grad_features'],
               f'roi_align_adaptive/{case} d(features)')


# ------------------------------------------------------------------------------------------------
# Anchors (torchvision AnchorGenerator convention: offset 0, rounded half extents, r = h / w)
# ------------------------------------------------------------------------------------------------

def _tv_level_shapes(goldens, anchor_ops, level: int):
  """(widths, heights) of one level from anchors.torchvision_anchor_shapes."""
  size = goldens['anchors/config/sizes'][level - ANCHOR_LEVELS[0]]
  ratios = goldens['anchors/config/aspect_ratios']
  return anchor_ops.torchvision_anchor_shapes([float(size)], [float(r) for r in ratios])


@pytest.mark.parametrize('level', ANCHOR_LEVELS)
def test_cell_anchors(goldens, anchor_ops, level):
  """AnchorGenerator.cell_anchors == the anchors of the single cell at (0, 0)."""
  widths, heights = _tv_level_shapes(goldens, anchor_ops, level)
  cell = anchor_ops.level_anchors(1, 1, 2 ** level, widths, heights, offset=0.0,
                                  round_half_extents=True)
  assert_close(cell, goldens[f'anchors/tv/cell_p{level}'], f'cell anchors p{level}')


@pytest.mark.parametrize('level', ANCHOR_LEVELS)
def test_level_anchors(goldens, anchor_ops, level):
  i = level - ANCHOR_LEVELS[0]
  stride = int(goldens['anchors/config/strides'][i])
  assert stride == 2 ** level
  fh, fw = (int(v) for v in goldens['anchors/config/feature_sizes'][i])
  widths, heights = _tv_level_shapes(goldens, anchor_ops, level)
  anchors = anchor_ops.level_anchors(fh, fw, stride, widths, heights, offset=0.0,
                                     round_half_extents=True)
  assert_close(anchors, goldens[f'anchors/tv/p{level}'], f'level_anchors p{level}')


def test_multilevel_anchors(goldens, anchor_ops):
  height, width = (int(v) for v in goldens['anchors/config/image_size'])
  shapes = {level: _tv_level_shapes(goldens, anchor_ops, level) for level in ANCHOR_LEVELS}
  anchors = anchor_ops.multilevel_anchors(height, width, ANCHOR_LEVELS[0], ANCHOR_LEVELS[-1],
                                          shapes, offset=0.0, round_half_extents=True)
  assert sorted(anchors) == [f'p{level}' for level in ANCHOR_LEVELS]
  for level in ANCHOR_LEVELS:
    assert_close(anchors[f'p{level}'], goldens[f'anchors/tv/p{level}'],
                 f'multilevel_anchors p{level}')
