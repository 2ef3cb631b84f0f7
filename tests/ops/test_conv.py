"""The matmul gradients of maskrcnn_jax.ops.conv (kernel gradients; input gradients as forward
convolutions, per phase when strided) against XLA's and NumPy loops; the bfloat16 products of the
inference path (`conv2d_products`, `layers.Dense`) against a NumPy loop and flax."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import modeling
from maskrcnn_jax.configs import load_config
from maskrcnn_jax.modeling import build_model, init_variables, layers, resolve_kernel_grad
from maskrcnn_jax.ops import conv as conv_ops

REPO = pathlib.Path(__file__).resolve().parents[2]


def _numpy_kernel_gradient(x, g, k, stride, padding):
  """dW[i, j, c, o] = sum over n, h, w of xpad[n, s*h + i, s*w + j, c] * g[n, h, w, o]."""
  (top, bottom), (left, right) = padding
  xp = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
  _, ho, wo, _ = g.shape
  dw = np.zeros((k, k, x.shape[-1], g.shape[-1]))
  for i in range(k):
    for j in range(k):
      for h in range(ho):
        for w in range(wo):
          dw[i, j] += xp[:, stride * h + i, stride * w + j].T @ g[:, h, w].astype(np.float64)
  return dw


def _numpy_input_gradient(g, kernel, x_shape, stride, padding):
  """dx[n, s*h + i - top, s*w + j - left] += g[n, h, w] @ kernel[i, j].T, then the padding cut."""
  (top, bottom), (left, right) = padding
  n, h, w, _ = x_shape
  dx = np.zeros((n, h + top + bottom + stride, w + left + right + stride, x_shape[-1]))
  k = kernel.shape[0]
  for i in range(k):
    for j in range(k):
      for y in range(g.shape[1]):
        for x in range(g.shape[2]):
          dx[:, stride * y + i, stride * x + j] += (g[:, y, x].astype(np.float64)
                                                    @ kernel[i, j].T.astype(np.float64))
  return dx[:, top:top + h, left:left + w]


def _numpy_conv(x, kernel, stride, padding):
  """y[n, h, w] = sum over i, j of xpad[n, s*h + i, s*w + j] @ kernel[i, j], in float64."""
  (top, bottom), (left, right) = padding
  xp = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
  k = kernel.shape[0]
  ho = (xp.shape[1] - k) // stride + 1
  wo = (xp.shape[2] - k) // stride + 1
  y = np.zeros((x.shape[0], ho, wo, kernel.shape[-1]))
  for i in range(k):
    for j in range(k):
      for h in range(ho):
        for w in range(wo):
          y[:, h, w] += xp[:, stride * h + i, stride * w + j] @ kernel[i, j].astype(np.float64)
  return y


def _gradients(kind, x, kernel, stride, padding, target):
  loss = lambda x, w: jnp.sum(conv_ops.conv2d(x, w, stride, padding, kind) * target)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)


# Every (kernel, stride) of the model (ResNet stem 7/2, 3x3 /1 and /2, 1x1 /1 and /2), explicit
# paddings k // 2 as the model's and asymmetric ones, odd and even sizes.
CASES = [
    (1, 1, ((0, 0), (0, 0)), (2, 6, 5)),
    (1, 2, ((0, 0), (0, 0)), (2, 7, 6)),
    (3, 1, ((1, 1), (1, 1)), (3, 5, 7)),
    (3, 2, ((1, 1), (1, 1)), (2, 9, 8)),
    (3, 2, ((1, 1), (1, 1)), (1, 8, 9)),
    (7, 2, ((3, 3), (3, 3)), (2, 11, 10)),
    (3, 1, ((0, 2), (2, 0)), (2, 6, 6)),
    (3, 2, ((0, 0), (0, 0)), (2, 7, 9)),
    (3, 2, ((0, 1), (0, 1)), (1, 8, 7)),  # the model's 'SAME' for even sizes (TF's)
    (1, 2, ((0, 0), (0, 0)), (1, 7, 8)),  # odd: the last row gets no gradient
    (3, 3, ((1, 1), (1, 1)), (1, 10, 11)),  # more phases than the model has
]


@pytest.mark.parametrize('k,stride,padding,shape', CASES)
def test_matmul_gradients_equal_xla_and_a_numpy_loop(k, stride, padding, shape):
  n, h, w = shape
  rng = np.random.default_rng(k * 10 + stride)
  x = rng.standard_normal((n, h, w, 5)).astype(np.float32)
  kernel = rng.standard_normal((k, k, 5, 4)).astype(np.float32)
  out = jax.eval_shape(lambda: conv_ops.conv2d(x, kernel, stride, padding, 'xla'))
  target = rng.standard_normal(out.shape).astype(np.float32)

  dx_xla, dw_xla = _gradients('xla', x, kernel, stride, padding, target)
  dx, dw = _gradients('matmul', x, kernel, stride, padding, target)
  np.testing.assert_array_equal(
      conv_ops.conv2d(x, kernel, stride, padding, 'matmul'),
      conv_ops.conv2d(x, kernel, stride, padding, 'xla'))
  # Forward convolutions of the swapped kernel (per phase if strided): the same sums in
  # another order.
  dx_scale = np.abs(dx_xla).max()
  np.testing.assert_allclose(dx, dx_xla, rtol=0, atol=1e-5 * dx_scale)
  np.testing.assert_allclose(dx, _numpy_input_gradient(target, kernel, x.shape, stride, padding),
                             rtol=0, atol=1e-5 * dx_scale)
  scale = np.abs(dw_xla).max()
  np.testing.assert_allclose(dw, dw_xla, rtol=0, atol=1e-5 * scale)
  reference = _numpy_kernel_gradient(x, target, k, stride, padding)
  np.testing.assert_allclose(dw, reference, rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(dw_xla, reference, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize('k,stride,padding,shape', CASES)
def test_bfloat16_products_equal_a_numpy_loop_of_the_rounded_operands(k, stride, padding, shape):
  """conv2d_products rounds x and the kernel to bfloat16 and sums their products in float32:
  the float64 convolution of the rounded operands up to float32 summation, every position
  (shifted rows that run past an image row must not leak into the kept outputs), in one block
  of rows and in blocks of 7 rows (the last one partial)."""
  n, h, w = shape
  rng = np.random.default_rng(k * 10 + stride + 1)
  x = rng.standard_normal((n, h, w, 5)).astype(np.float32)
  kernel = rng.standard_normal((k, k, 5, 4)).astype(np.float32)
  y = conv_ops.conv2d_products(x, kernel, stride, padding)
  rounded = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32)
  reference = _numpy_conv(rounded(x), rounded(kernel), stride, padding)
  assert y.dtype == jnp.float32 and y.shape == reference.shape
  np.testing.assert_allclose(y, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
  np.testing.assert_allclose(conv_ops.conv2d_products(x, kernel, stride, padding, block_rows=7),
                             reference, rtol=0, atol=1e-5 * np.abs(reference).max())
  # ... and within bfloat16 rounding of the float32 convolution.
  exact = _numpy_conv(x, kernel, stride, padding)
  np.testing.assert_allclose(y, exact, rtol=0, atol=2e-2 * np.abs(exact).max())


@pytest.mark.parametrize('k,stride,padding,shape', CASES)
def test_bfloat16_products_gradients_equal_numpy_loops_of_the_rounded_operands(k, stride, padding,
                                                                               shape):
  """conv2d_products' gradients are bfloat16 products accumulated in float32: the float64
  input and kernel gradients of the rounded x, kernel and output gradient, up to float32
  summation, with the forward in blocks of 7 rows and the kernel gradient in blocks of 5 (the
  last one partial) or in one block; they come back in the operands' dtypes."""
  n, h, w = shape
  rng = np.random.default_rng(k * 10 + stride + 2)
  x = rng.standard_normal((n, h, w, 5)).astype(np.float32)
  kernel = rng.standard_normal((k, k, 5, 4)).astype(np.float32)
  products = lambda x, w: conv_ops.conv2d_products(x, w, stride, padding, block_rows=7,
                                                   gradient_block_rows=5)
  target = rng.standard_normal(jax.eval_shape(products, x, kernel).shape).astype(np.float32)
  dx, dw = jax.jit(lambda x, w, g: jax.vjp(products, x, w)[1](g))(x, kernel, target)
  rounded = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32)
  dx_ref = _numpy_input_gradient(rounded(target), rounded(kernel), x.shape, stride, padding)
  dw_ref = _numpy_kernel_gradient(rounded(x), rounded(target), k, stride, padding)
  assert dx.dtype == dw.dtype == jnp.float32
  np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-5 * np.abs(dx_ref).max())
  np.testing.assert_allclose(dw, dw_ref, rtol=0, atol=1e-5 * np.abs(dw_ref).max())
  one_block = lambda x, w: conv_ops.conv2d_products(x, w, stride, padding)
  _, dw_one = jax.jit(lambda x, w, g: jax.vjp(one_block, x, w)[1](g))(x, kernel, target)
  np.testing.assert_allclose(dw_one, dw_ref, rtol=0, atol=1e-5 * np.abs(dw_ref).max())
  # ... within bfloat16 rounding of the float32 gradients; bfloat16 inputs, bfloat16 gradients.
  exact = _numpy_kernel_gradient(x, target, k, stride, padding)
  np.testing.assert_allclose(dw, exact, rtol=0, atol=3e-2 * np.abs(exact).max())
  low = jax.grad(lambda x: jnp.sum(products(x, kernel) * target))(x.astype(jnp.bfloat16))
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), dx_ref, rtol=0,
                             atol=1e-2 * np.abs(dx_ref).max())


def _products_of(compiled_text: str) -> list[tuple[str, str, str, str]]:
  """(lhs type, rhs type, lhs contracting dims, lhs rank) of every dot in a compiled HLO text."""
  values = re.findall(r'%([\w.\-]+) = (\w+)\[([\d,]*)\]', compiled_text)
  types = {name: dtype for name, dtype, _ in values}
  ranks = {name: len(dims.split(',')) if dims else 0 for name, _, dims in values}
  dots = re.findall(r' dot\(%([\w.\-]+), %([\w.\-]+)\),.*?lhs_contracting_dims=\{([\d,]*)\}',
                    compiled_text)
  return [(types[lhs], types[rhs], dims, ranks[lhs]) for lhs, rhs, dims in dots]


@pytest.mark.parametrize('k,stride', [(3, 1), (3, 2), (1, 1), (1, 2), (None, None)],
                         ids=['3x3', '3x3-stride2', '1x1', '1x1-stride2', 'dense'])
def test_bfloat16_gradient_products_are_standard_bfloat16_products(k, stride):
  """Every matrix product of conv2d_products' (k x k kernel) and dot_products' (k None)
  gradient programs takes bfloat16 operands, the left one contracting its last (row-major)
  dimension: the form that XLA:CPU runs on its bfloat16 units. A kernel gradient written as
  x^T g (both operands contracting their rows) was computed in float32 instead
  (docs/performance.md)."""
  x = jnp.ones((2, 9, 9, 8))
  if k is None:
    kernel = jnp.full((8, 16), 0.1)
    loss = lambda x, w: jnp.sum(conv_ops.dot_products(x.reshape(-1, 8), w) ** 2)
  else:
    kernel = jnp.full((k, k, 8, 16), 0.1)
    padding = ((k // 2, k // 2), (k // 2, k // 2))
    loss = lambda x, w: jnp.sum(conv_ops.conv2d_products(x, w, stride, padding) ** 2)
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
  products = _products_of(text)
  assert len(products) >= 2, text
  for lhs, rhs, dims, rank in products:
    assert lhs == rhs == 'bf16' and dims == str(rank - 1), products


def test_bfloat16_gradients_of_a_conv_and_a_dense_layer_together():
  """Both kernels' gradients of dense(conv(x)) with bfloat16 products, taken in one program,
  within bfloat16 rounding of float32 XLA's; the program returns them in the default
  (row-major) layout. A layout constraint on the kernel gradients' products once made XLA
  return the convolution's kernel gradient in another layout, which JAX read as row-major
  (relative error 1.1 here), only when both kernels were differentiated."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((4, 12, 12, 16)), jnp.float32)
  kernel = jnp.asarray(0.1 * rng.standard_normal((3, 3, 16, 8)), jnp.float32)
  dense = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
  padding = ((1, 1), (1, 1))

  def products(kernel, dense):
    y = conv_ops.conv2d_products(x, kernel, 1, padding, gradient_block_rows=64)
    return jnp.sum(conv_ops.dot_products(y, dense) ** 2)

  def xla(kernel, dense):
    return jnp.sum((conv_ops.conv2d(x, kernel, 1, padding, 'xla') @ dense) ** 2)

  compiled = jax.jit(jax.grad(products, argnums=(0, 1))).lower(kernel, dense).compile()
  assert [f.layout.major_to_minor for f in compiled.output_formats] == [(0, 1, 2, 3), (0, 1)]
  ours = compiled(kernel, dense)
  reference = jax.jit(jax.grad(xla, argnums=(0, 1)))(kernel, dense)
  for got, want in zip(ours, reference):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * np.abs(want).max())


def test_dense_has_flax_denses_parameters_and_outputs():
  """layers.Dense replaced flax.linen.Dense in the box head: the same parameters from the same
  key and the same float32 outputs; 'bfloat16' products are the rounded operands' product."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 3, 40)), jnp.float32)
  ours, theirs = layers.Dense(7), nn.Dense(7)
  v_ours, v_flax = ours.init(jax.random.key(4), x), theirs.init(jax.random.key(4), x)
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_flax)
  jax.tree.map(np.testing.assert_array_equal, v_ours, v_flax)
  v_flax['params']['bias'] = jnp.arange(7.0)
  np.testing.assert_array_equal(ours.apply(v_flax, x), theirs.apply(v_flax, x))
  y = layers.Dense(7, products='bfloat16').apply(v_flax, x)
  rounded = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
  reference = rounded(x) @ rounded(v_flax['params']['kernel']) + np.arange(7.0)
  np.testing.assert_allclose(y, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
  # Its gradients: bfloat16 products of the rounded output gradient and operands.
  g = rng.standard_normal(y.shape).astype(np.float32)
  dense = lambda v, x: layers.Dense(7, products='bfloat16').apply(v, x)
  dv, dx = jax.vjp(dense, v_flax, x)[1](g)
  np.testing.assert_allclose(
      dx, rounded(g) @ rounded(v_flax['params']['kernel']).T, rtol=0, atol=1e-5 * np.abs(dx).max())
  dw = dv['params']['kernel']
  dw_ref = rounded(x).reshape(-1, 40).T @ rounded(g).reshape(-1, 7)
  np.testing.assert_allclose(dw, dw_ref, rtol=0, atol=1e-5 * np.abs(dw_ref).max())
  np.testing.assert_allclose(dv['params']['bias'], g.sum((0, 1)), rtol=1e-5)
  with pytest.raises(ValueError, match='products'):
    layers.Dense(7, products='int8').apply(v_flax, x)


@pytest.mark.parametrize('key', ['inference_products', 'train_products'])
def test_bfloat16_products_reach_every_conv_but_the_stem_of_their_module_only(monkeypatch, key):
  """model.inference_products='bfloat16' (build_model(inference=True)) or train_products (the
  training module): every convolution of that module with >= MIN_PRODUCT_CHANNELS input
  channels runs conv2d_products, the others (the stem) and every convolution of the other
  module keep conv2d; the parameter trees are the same."""
  config = load_config(REPO / 'configs' / 'tiny.py')
  assert config.model.inference_products == config.model.train_products == 'float32'
  config.model[key] = 'bfloat16'
  calls = []

  def spying(name):
    original = getattr(layers, name)

    def spy(x, *args, **kwargs):
      calls.append((name, x.shape[-1]))
      return original(x, *args, **kwargs)
    return spy

  for name in ('conv2d', 'conv2d_products'):
    monkeypatch.setattr(layers, name, spying(name))
  size = tuple(config.data.image_size)
  trees, seen = {}, {}
  for inference in (False, True):
    model = build_model(config.model, inference=inference)
    calls.clear()
    trees[inference] = jax.eval_shape(lambda key, m=model: init_variables(m, key, size),
                                      jax.random.key(0))
    seen[inference] = list(calls)
  with_products = key == 'inference_products'
  assert {kind for kind, _ in seen[not with_products]} == {'conv2d'}
  assert [c for _, c in seen[True]] == [c for _, c in seen[False]]  # the same convolutions
  expected = [('conv2d_products' if c >= layers.MIN_PRODUCT_CHANNELS else 'conv2d', c)
              for _, c in seen[False]]
  assert seen[with_products] == expected and ('conv2d', 3) in expected  # the stem
  assert sum(kind == 'conv2d_products' for kind, _ in expected) > 10
  assert (jax.tree.map(lambda a: a.shape, trees[False])
          == jax.tree.map(lambda a: a.shape, trees[True]))


def test_cpu_flags_and_the_warning_for_a_cpu_without_bfloat16_instructions(
    tmp_path, monkeypatch, caplog):
  x86, arm = tmp_path / 'x86', tmp_path / 'arm'
  x86.write_text('processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t: sse\n')
  arm.write_text('processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n')
  assert modeling.cpu_flags(str(x86)) == {'fpu', 'avx2', 'fma'}  # the first CPU's
  assert 'bf16' in modeling.cpu_flags(str(arm))
  assert modeling.cpu_flags(str(tmp_path / 'absent')) is None
  config = load_config(REPO / 'configs' / 'tiny.py')
  config.model.inference_products = 'bfloat16'
  warned = lambda: [r for r in caplog.records if 'without bfloat16 instructions' in r.message]
  for flags, expected in ((frozenset({'avx2'}), 1), (frozenset({'avx2', 'avx512_bf16'}), 0),
                          (None, 0)):
    caplog.clear()
    monkeypatch.setattr(modeling, 'cpu_flags', lambda flags=flags: flags)
    modeling._warn_without_bfloat16_instructions.cache_clear()  # pylint: disable=protected-access
    build_model(config.model)                      # training module: float32
    build_model(config.model, inference=True)
    build_model(config.model, inference=True)      # once per process and key
    assert len(warned()) == expected, (flags, caplog.text)
    config.model.train_products = 'bfloat16'
    build_model(config.model)
    build_model(config.model)
    assert len(warned()) == 2 * expected, (flags, caplog.text)
    assert all('model.inference_products' in r.message for r in warned()[:expected])
    assert all('model.train_products' in r.message for r in warned()[expected:])
    config.model.train_products = 'float32'
  modeling._warn_without_bfloat16_instructions.cache_clear()  # pylint: disable=protected-access


def test_matmul_gradients_in_a_conditional_branch_are_forward_order_convolutions():
  """XLA's transpose of a convolution has an 'OI'-ordered kernel that XLA:CPU leaves on its slow
  generic loop inside a conditional's branch (the bucketed mask head's); 'matmul' writes the
  input gradient as forward convolutions, so the compiled branch has only 'IO' kernels."""
  x = jnp.ones((2, 6, 6, 8))
  kernels = (jnp.ones((3, 3, 8, 8)), jnp.ones((1, 1, 8, 8)))

  def loss(kernels, x, index):
    def branch(n):
      def f(kernels, x):
        y = x[:n]
        for kernel in kernels:
          pad = kernel.shape[0] // 2
          y = conv_ops.conv2d(y, kernel, 1, ((pad, pad), (pad, pad)), 'matmul')
        return jnp.sum(y * y)
      return f
    return jax.lax.switch(index, [branch(1), branch(2)], kernels, x)

  hlo = jax.jit(jax.grad(loss)).lower(kernels, x, 1).compile().as_text()
  labels = re.findall(r'dim_labels=\w+_(\w+)->', hlo)
  assert labels and all(label.endswith('io') for label in labels), labels


def test_bfloat16_gradients_keep_the_kernel_dtype_and_accumulate_in_float32():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 9, 9, 8)), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 8, 6)), jnp.bfloat16)
  target = jnp.asarray(rng.standard_normal((2, 9, 9, 6)), jnp.bfloat16)
  padding = ((1, 1), (1, 1))
  dx, dw = _gradients('matmul', x, kernel, 1, padding, target)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  reference = _numpy_kernel_gradient(np.asarray(x, np.float32), np.asarray(target, np.float32),
                                     3, 1, padding)
  # Products of bfloat16 values are exact in float32: only the final rounding to bfloat16.
  np.testing.assert_allclose(np.asarray(dw, np.float32), reference, rtol=2 ** -8, atol=1e-2)


def test_unknown_algorithm_is_an_error():
  with pytest.raises(ValueError, match='kernel_grad'):
    conv_ops.conv2d(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 1, 2, 2)), 1, ((0, 0), (0, 0)), 'im2col')


@pytest.mark.parametrize('kernel_grad', ['xla', 'matmul'])
def test_conv_module_has_flax_convs_parameters_and_outputs(kernel_grad):
  """layers.Conv replaced flax.linen.Conv: the same parameter tree and values from the same
  key (so checkpoints, goldens and torchvision imports are unchanged) and the same outputs."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9, 9, 3)), jnp.float32)
  ours = layers.conv(6, 3, 2, use_bias=True, kernel_grad=kernel_grad)
  flax_conv = nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=True,
                      kernel_init=layers.MSRA_FILL)
  v_ours = ours.init(jax.random.key(3), x)
  v_flax = flax_conv.init(jax.random.key(3), x)
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_flax)
  jax.tree.map(np.testing.assert_array_equal, v_ours, v_flax)
  v_flax['params']['bias'] = jnp.arange(6.0)
  np.testing.assert_array_equal(ours.apply(v_flax, x), flax_conv.apply(v_flax, x))


def test_auto_is_matmul_on_the_cpu_and_reaches_every_conv(monkeypatch):
  assert jax.default_backend() == 'cpu'
  assert resolve_kernel_grad('auto') == 'matmul'
  assert resolve_kernel_grad('xla') == 'xla'
  config = load_config(REPO / 'configs' / 'tiny.py')
  assert config.model.conv_kernel_grad == 'auto'
  seen = []

  def spy(x, kernel, stride, padding, kernel_grad='xla'):
    seen.append(kernel_grad)
    return conv_ops.conv2d(x, kernel, stride, padding, kernel_grad)

  monkeypatch.setattr(layers, 'conv2d', spy)
  for choice, expected in (('auto', 'matmul'), ('xla', 'xla')):
    config.model.conv_kernel_grad = choice
    model = build_model(config.model)
    seen.clear()
    size = tuple(config.data.image_size)
    variables = jax.eval_shape(lambda key: init_variables(model, key, size), jax.random.key(0))
    num_convs = sum(1 for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
                    if path[-1].key == 'kernel' and leaf.ndim == 4
                    and 'deconv' not in jax.tree_util.keystr(path))
    assert seen == [expected] * len(seen) and len(seen) >= num_convs > 10
