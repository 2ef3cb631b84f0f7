"""Starting from trained weights with another number of classes (fine-tuning to your own classes).

A torchvision-layout state dict (synthetic values, the names and shapes torchvision gives this
architecture) and a saved checkpoint of ours, both with 91 classes, go into configs/tiny_smoke.py
models of 4 and 91 classes: everything but the class-dependent layers (box classifier, box
regressor, mask predictor) is loaded, those keep the fresh initialisation and are logged; any
other mismatch is an error naming the parameter. Also: config.init validation, check_num_classes.
"""

import logging
import pathlib

import jax
import numpy as np
import pytest

from maskrcnn_jax import modeling
from maskrcnn_jax.configs import import_config_module, load_config, validate_config
from maskrcnn_jax.settings import ConfigError
from maskrcnn_jax.train import checkpoint as ckpt
from maskrcnn_jax.train import experiment
from maskrcnn_jax.weights import (CheckpointMismatchError, WeightImportError, from_torchvision,
                                  load_checkpoint)
from maskrcnn_jax.weights.synthetic import synthetic_torchvision_state_dict
from maskrcnn_jax.weights.transfer import Comparison, plan_transfer

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE_CLASSES, TARGET_CLASSES = 91, 4
LOGGER = 'maskrcnn_jax.weights.transfer'
# flax (module, layer) of the class-dependent layers and their torchvision modules.
CLASS_LAYERS = {('box_head', 'class_logits'): 'roi_heads.box_predictor.cls_score',
                ('box_head', 'box_deltas'): 'roi_heads.box_predictor.bbox_pred',
                ('mask_head', 'mask_logits'): 'roi_heads.mask_predictor.mask_fcn_logits'}


def _config(num_classes=TARGET_CLASSES, **init):
  config = load_config(ROOT / 'configs/tiny_smoke.py')
  config.model.num_classes = num_classes
  for k, v in init.items():
    config.init[k] = v
  return config


def _torchvision_names_and_shapes(config, num_classes):
  """The state-dict names and shapes torchvision's maskrcnn_resnet50_fpn code gives this
  architecture (ResNet-18 body, frozen batch norm), written out independently of the importer."""
  m = config.model
  c, mlp, conv_dim = m.fpn_channels, m.roi.mlp_head_dim, m.mask.conv_dim
  body = 'backbone.body.'

  def bn(prefix, n):
    return [(f'{prefix}.{leaf}', (n,)) for leaf in ('weight', 'bias', 'running_mean',
                                                     'running_var')]

  out = [(body + 'conv1.weight', (64, 3, 7, 7))] + bn(body + 'bn1', 64)
  cin = 64
  for i, width in enumerate((64, 128, 256, 512)):
    for j in range(2):
      p = f'{body}layer{i + 1}.{j}'
      out += [(f'{p}.conv1.weight', (width, cin if j == 0 else width, 3, 3))]
      out += bn(f'{p}.bn1', width)
      out += [(f'{p}.conv2.weight', (width, width, 3, 3))] + bn(f'{p}.bn2', width)
      if j == 0 and i > 0:
        out += [(f'{p}.downsample.0.weight', (width, cin, 1, 1))]
        out += bn(f'{p}.downsample.1', width)
    cin = width
  for i, cin in enumerate((64, 128, 256, 512)):
    out += [(f'backbone.fpn.inner_blocks.{i}.0.weight', (c, cin, 1, 1)),
            (f'backbone.fpn.inner_blocks.{i}.0.bias', (c,)),
            (f'backbone.fpn.layer_blocks.{i}.0.weight', (c, c, 3, 3)),
            (f'backbone.fpn.layer_blocks.{i}.0.bias', (c,))]
  anchors = len(m.anchors.aspect_ratios) * m.anchors.num_scales
  out += [('rpn.head.conv.0.0.weight', (c, c, 3, 3)), ('rpn.head.conv.0.0.bias', (c,)),
          ('rpn.head.cls_logits.weight', (anchors, c, 1, 1)),
          ('rpn.head.cls_logits.bias', (anchors,)),
          ('rpn.head.bbox_pred.weight', (4 * anchors, c, 1, 1)),
          ('rpn.head.bbox_pred.bias', (4 * anchors,))]
  s = m.roi.pooler_size
  out += [('roi_heads.box_head.fc6.weight', (mlp, c * s * s)),
          ('roi_heads.box_head.fc6.bias', (mlp,)),
          ('roi_heads.box_head.fc7.weight', (mlp, mlp)), ('roi_heads.box_head.fc7.bias', (mlp,)),
          ('roi_heads.box_predictor.cls_score.weight', (num_classes, mlp)),
          ('roi_heads.box_predictor.cls_score.bias', (num_classes,)),
          ('roi_heads.box_predictor.bbox_pred.weight', (4 * num_classes, mlp)),
          ('roi_heads.box_predictor.bbox_pred.bias', (4 * num_classes,))]
  cin = c
  for i in range(m.mask.num_convs):
    out += [(f'roi_heads.mask_head.{i}.0.weight', (conv_dim, cin, 3, 3)),
            (f'roi_heads.mask_head.{i}.0.bias', (conv_dim,))]
    cin = conv_dim
  out += [('roi_heads.mask_predictor.conv5_mask.weight', (conv_dim, conv_dim, 2, 2)),
          ('roi_heads.mask_predictor.conv5_mask.bias', (conv_dim,)),
          ('roi_heads.mask_predictor.mask_fcn_logits.weight', (num_classes, conv_dim, 1, 1)),
          ('roi_heads.mask_predictor.mask_fcn_logits.bias', (num_classes,))]
  return out


def _leaves(tree):
  return {tuple(str(k.key) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_class_layer(path):
  return path[1:3] in CLASS_LAYERS


def _skip_lines(caplog):
  return [r.getMessage() for r in caplog.records
          if r.name == LOGGER and 'class-dependent' in r.getMessage()]


def _assert_transferred(loaded, source, fresh):
  """Every leaf but the class layers' equals `source` (and differs from `fresh`); the class
  layers' equal `fresh`."""
  got, src, new = _leaves(loaded), _leaves(source), _leaves(fresh)
  assert got.keys() == new.keys()
  class_paths = sorted(p for p in got if _is_class_layer(p))
  assert len(class_paths) == 6
  for p, value in got.items():
    assert value.dtype == new[p].dtype and value.shape == new[p].shape, p
    if _is_class_layer(p):
      np.testing.assert_array_equal(value, new[p], err_msg=str(p))
      assert src[p].shape != value.shape, p
    else:
      np.testing.assert_array_equal(value, src[p], err_msg=str(p))
      assert not np.array_equal(value, new[p]), f'{p} was not loaded'


@pytest.fixture(scope='module')
def models():
  """(config, model, variables) for 4 classes (fresh) and 91 (abstract: the shapes only)."""
  key = jax.random.PRNGKey(0)
  out = {}
  for k in (TARGET_CLASSES, SOURCE_CLASSES):
    config = _config(k)
    model = experiment.build_model(config)
    init = lambda model=model, config=config: modeling.init_variables(
        model, key, tuple(config.data.image_size))
    out[k] = (config, model, jax.device_get(init()) if k == TARGET_CLASSES else
              jax.eval_shape(init))
  return key, out


@pytest.fixture(scope='module')
def state_dict_91(models):
  _, by_classes = models
  config = by_classes[SOURCE_CLASSES][0]
  return synthetic_torchvision_state_dict(_torchvision_names_and_shapes(config, SOURCE_CLASSES),
                                          seed=5)


def _import_kwargs(config):
  return dict(pooler_size=config.model.roi.pooler_size, min_level=config.model.min_level)


# ------------------------------------------------------------------------------ torchvision
def test_torchvision_91_classes_into_4_keeps_fresh_class_layers(models, state_dict_91, tmp_path,
                                                                caplog):
  key, by_classes = models
  config91, _, abstract91 = by_classes[SOURCE_CLASSES]
  # The 91-class import loads every tensor: the reference for the shared ones.
  full = from_torchvision(state_dict_91, abstract91, **_import_kwargs(config91))
  path = tmp_path / 'maskrcnn_91.npz'
  np.savez(path, **state_dict_91)
  config = _config(TARGET_CLASSES, torchvision_maskrcnn=str(path))
  validate_config(config)
  _, model4, fresh4 = by_classes[TARGET_CLASSES]
  with caplog.at_level(logging.INFO, logger=LOGGER):
    loaded = jax.device_get(experiment.build_initial_variables(config, model4, key))
  _assert_transferred(loaded, full, fresh4)
  lines = _skip_lines(caplog)
  assert len(lines) == 6, lines
  mlp, conv_dim = config.model.roi.mlp_head_dim, config.model.mask.conv_dim
  expected = {  # torchvision name: flax-layout source shape -> target shape
      'roi_heads.box_predictor.cls_score.weight': f'{(mlp, 91)} -> target {(mlp, 4)}',
      'roi_heads.box_predictor.cls_score.bias': '(91,) -> target (4,)',
      'roi_heads.box_predictor.bbox_pred.weight': f'{(mlp, 364)} -> target {(mlp, 16)}',
      'roi_heads.box_predictor.bbox_pred.bias': '(364,) -> target (16,)',
      'roi_heads.mask_predictor.mask_fcn_logits.weight':
          f'{(1, 1, conv_dim, 91)} -> target {(1, 1, conv_dim, 4)}',
      'roi_heads.mask_predictor.mask_fcn_logits.bias': '(91,) -> target (4,)',
  }
  for name, shapes in expected.items():
    assert sum(f'{name} ' in line and f'source {shapes}' in line for line in lines) == 1, name


def test_torchvision_other_mismatch_still_raises(models, state_dict_91):
  _, by_classes = models
  config, _, fresh4 = by_classes[TARGET_CLASSES]
  c = config.model.fpn_channels
  broken = dict(state_dict_91)
  broken['backbone.fpn.layer_blocks.1.0.weight'] = np.zeros((c, c + 8, 3, 3), np.float32)
  with pytest.raises(WeightImportError) as info:
    from_torchvision(broken, fresh4, **_import_kwargs(config))
  message = str(info.value)
  assert 'backbone.fpn.layer_blocks.1.0.weight' in message
  assert f'{(c, c + 8, 3, 3)}' in message and f'{(3, 3, c, c)}' in message
  assert 'cls_score' not in message  # the class layers are not errors
  # Abstract shapes cannot supply the fresh class layers: a clear error, not a silent gap.
  with pytest.raises(WeightImportError, match='fresh variables'):
    from_torchvision(state_dict_91, jax.eval_shape(lambda: fresh4), **_import_kwargs(config))


def test_class_layers_must_agree_on_one_source_class_count():
  def comp(module, layer, leaf, source, target):
    return Comparison(('params', module, layer, leaf), layer, source, target)

  consistent = [comp('box_head', 'class_logits', 'kernel', (8, 91), (8, 4)),
                comp('box_head', 'box_deltas', 'kernel', (8, 364), (8, 16)),
                comp('mask_head', 'mask_logits', 'bias', (91,), (4,)),
                comp('box_head', 'fc7', 'kernel', (8, 8), (8, 8))]
  skipped, errors = plan_transfer(consistent)
  assert len(skipped) == 3 and not errors
  # The mask predictor says 81 classes, the box predictor 91: nothing is skipped.
  mixed = consistent[:2] + [comp('mask_head', 'mask_logits', 'bias', (81,), (4,))]
  skipped, errors = plan_transfer(mixed)
  assert not skipped and len(errors) == 3
  # Another axis differs too (the head width): an error.
  skipped, errors = plan_transfer([comp('box_head', 'class_logits', 'kernel', (16, 91), (8, 4))])
  assert not skipped and len(errors) == 1
  # A layer that is not class-dependent never is skipped.
  skipped, errors = plan_transfer(consistent + [comp('box_head', 'fc6', 'bias', (9,), (8,))])
  assert len(skipped) == 3 and [e.path[2] for e in errors] == ['fc6']


# ------------------------------------------------------------------------------ our checkpoints
@pytest.fixture(scope='module')
def source_workdir(models, state_dict_91, tmp_path_factory):
  """A workdir of ours with a 91-class model, saved as the training loop saves its state: step 2
  (the latest) the synthetic torchvision weights, step 1 other values (half of them)."""
  _, by_classes = models
  config, _, abstract91 = by_classes[SOURCE_CLASSES]
  full = from_torchvision(state_dict_91, abstract91, **_import_kwargs(config))
  earlier = jax.tree_util.tree_map(lambda x: x * np.float32(0.5), full)
  workdir = tmp_path_factory.mktemp('source_91')
  exp = experiment.build_experiment(config, jax.local_devices()[:1])
  manager = ckpt.create_manager(str(workdir))
  for step, variables in ((1, earlier), (2, full)):
    ckpt.save(manager, step, jax.device_get(exp.create_state(variables)), force=True)
  manager.wait_until_finished()
  manager.close()
  return workdir, full, earlier


def test_checkpoint_91_classes_into_4(models, source_workdir, caplog):
  key, by_classes = models
  workdir, source, _ = source_workdir
  config = _config(TARGET_CLASSES, checkpoint=str(workdir))
  validate_config(config)
  _, model4, fresh4 = by_classes[TARGET_CLASSES]
  with caplog.at_level(logging.INFO, logger=LOGGER):
    loaded = jax.device_get(experiment.build_initial_variables(config, model4, key))
  _assert_transferred(loaded, source, fresh4)  # step 2, the latest
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(fresh4)
  lines = _skip_lines(caplog)
  assert len(lines) == 6, lines
  mlp = config.model.roi.mlp_head_dim
  assert any('params/box_head/class_logits/kernel' in l
             and f'source {(mlp, 91)} -> target {(mlp, 4)}' in l for l in lines), lines
  assert any('params/box_head/box_deltas/bias' in l and 'source (364,) -> target (16,)' in l
             for l in lines), lines


def test_checkpoint_same_classes_loads_everything(models, source_workdir, caplog):
  _, by_classes = models
  workdir, source, earlier = source_workdir
  target = by_classes[SOURCE_CLASSES][2]  # abstract: nothing needs a fresh value
  with caplog.at_level(logging.INFO, logger=LOGGER):
    latest = load_checkpoint(target, workdir)
    step1 = load_checkpoint(target, workdir / 'checkpoints' / '1')
  assert not _skip_lines(caplog)
  for loaded, expected in ((latest, source), (step1, earlier)):
    got, want = _leaves(loaded), _leaves(expected)
    assert got.keys() == want.keys() and len(got) > 100
    for p in got:
      np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
  assert not np.array_equal(latest['params']['fpn']['output_p2']['kernel'],
                            step1['params']['fpn']['output_p2']['kernel'])


def test_checkpoint_other_mismatch_raises_naming_the_parameter(source_workdir, tmp_path):
  workdir, _, _ = source_workdir
  config = _config(TARGET_CLASSES)
  config.model.fpn_channels = 24
  model = experiment.build_model(config)
  target = jax.eval_shape(lambda: modeling.init_variables(
      model, jax.random.PRNGKey(0), tuple(config.data.image_size)))
  with pytest.raises(CheckpointMismatchError) as info:
    load_checkpoint(target, workdir)
  message = str(info.value)
  assert 'params/fpn/lateral_p2/kernel (1, 1, 64, 16) -> (1, 1, 64, 24)' in message
  assert 'class_logits' not in message
  with pytest.raises(FileNotFoundError, match='no checkpoint under'):
    load_checkpoint(target, tmp_path)
  # Abstract shapes cannot supply the fresh class layers.
  config.model.fpn_channels = 16
  model = experiment.build_model(config)
  target = jax.eval_shape(lambda: modeling.init_variables(
      model, jax.random.PRNGKey(0), tuple(config.data.image_size)))
  with pytest.raises(CheckpointMismatchError, match='fresh variables'):
    load_checkpoint(target, workdir)


def test_init_checkpoint_validation(source_workdir, tmp_path):
  workdir, _, _ = source_workdir
  (tmp_path / 'w.npz').write_bytes(b'')
  for key in ('torchvision_maskrcnn', 'torchvision_backbone'):
    config = _config(checkpoint=str(workdir), **{key: str(tmp_path / 'w.npz')})
    with pytest.raises(ConfigError) as info:
      validate_config(config)
    message = str(info.value)
    assert f'init.{key}' in message and 'init.checkpoint' in message
    assert '\n' not in message
    # A config changed after validation (as inference.Predictor.from_torchvision does).
    with pytest.raises(ConfigError, match='init.checkpoint'):
      experiment.build_initial_variables(config, None, None)
  with pytest.raises(ConfigError, match="'init.checkpoint'.*no such directory"):
    validate_config(_config(checkpoint=str(tmp_path / 'missing')))
  assert _config().init.checkpoint == ''


# ------------------------------------------------------------------------------ class count
def test_check_num_classes_names_key_numbers_and_dataset():
  shapes = {'class_index_to_category_id': {'1': 1, '2': 2, '3': 3},
            'categories': [{'id': 1}, {'id': 2}, {'id': 3}]}
  config = _config(3)
  with pytest.raises(ConfigError) as info:
    experiment.check_num_classes(config, shapes, 'coco_instances/shapes train')
  message = str(info.value)
  assert "'model.num_classes' = 3" in message and '>= 4' in message
  assert 'coco_instances/shapes train' in message and '\n' not in message
  experiment.check_num_classes(_config(4), shapes, 'shapes')
  experiment.check_num_classes(_config(91), shapes, 'shapes')
  # Without the table: the categories' largest id (a contiguous table differs from the ids).
  ids = {'categories': [{'id': 7}, {'id': 90}]}
  with pytest.raises(ConfigError, match='>= 91'):
    experiment.check_num_classes(_config(90), ids, 'ids')
  experiment.check_num_classes(_config(91), ids, 'ids')
  contiguous = {'class_index_to_category_id': {'1': 7, '2': 90}, 'categories': ids['categories']}
  experiment.check_num_classes(_config(3), contiguous, 'contiguous')
  with pytest.raises(ConfigError, match='= 2 is too small'):
    experiment.check_num_classes(_config(2), contiguous, 'contiguous')


def test_finetune_shapes_config(source_workdir):
  """configs/finetune_shapes.py: shapes_demo's model (so a demo workdir is a valid source), a
  smaller learning rate, clipping, and the source named by init.checkpoint."""
  workdir, _, _ = source_workdir
  base = load_config(ROOT / 'configs/shapes_demo.py')
  module = import_config_module(ROOT / 'configs/finetune_shapes.py')
  config = module.get_config()
  assert config.init.checkpoint == module.DEMO_WORKDIR
  config.init.checkpoint = str(workdir)
  validate_config(config)
  assert config.model.to_dict() == base.model.to_dict()
  assert config.data.to_dict() == base.data.to_dict()
  assert config.train.learning_rate <= base.train.learning_rate / 5
  assert config.train.gradient_clip_norm > 0
  assert config.train.warmup_steps < config.train.total_steps


def test_predictor_from_torchvision_holds_the_imported_weights(models, state_dict_91, tmp_path):
  """`inference.Predictor.from_torchvision`: the imported tensors, and detections on a real image."""
  from maskrcnn_jax import inference  # pylint: disable=import-outside-toplevel
  _, by_classes = models
  config91, _, abstract91 = by_classes[SOURCE_CLASSES]
  path = tmp_path / 'maskrcnn_91.npz'
  np.savez(path, **state_dict_91)
  predictor = inference.Predictor.from_torchvision(str(path), config91)
  want = _leaves(from_torchvision(state_dict_91, abstract91, **_import_kwargs(config91)))
  got = _leaves(jax.device_get(predictor.variables))
  assert set(got) == set(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=str(name))
  image = sorted((ROOT / 'tests' / 'data' / 'coco_sample' / 'val2017').iterdir())[0]
  [record] = predictor.predict(image, score_threshold=0.0)
  assert len(record['scores']) > 0 and record['masks'].shape[1:] == record['image_size']
  assert np.all(np.diff(record['scores']) <= 0)  # best first
