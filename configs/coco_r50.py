"""Mask R-CNN ResNet-50-FPN on COCO 2017: the NVIDIA TF2 reference's defaults.

Every value mirrors `shared/seed/defaults.md` (the reference's `mask_rcnn_params.py` and
`cmdline_utils.py`). The training schedule is the reference's command-line default (2 images per
GPU, lr 2.5e-3); the launch scripts in `launch/` set the 1/4/8-GPU schedules.

Command (8 GPUs, the reference's 1x schedule, about 0.38 box AP / 0.34 mask AP expected):
  python -m maskrcnn_jax.main --config=configs/coco_r50.py --workdir=/tmp/mrcnn \
    --config.train.per_device_batch_size=4 --config.train.learning_rate=0.04 \
    --config.train.total_steps=45000 --config.train.learning_rate_steps='(30000, 40000)'
Command-line overrides use the dotted key names below, e.g. `--config.model.precision=bfloat16`.
"""

import ml_collections


def get_config(arg=None):
  """Returns the reference configuration. ``arg`` is unused (ml_collections convention)."""
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  # train, eval, train_and_eval (the reference's three modes).
  config.mode = 'train_and_eval'

  # ---------------------------------------------------------------- data
  data = config.data = ml_collections.ConfigDict()
  data.tfds_name = 'coco_instances'     # the project's TFDS builder (maskrcnn_jax.data)
  data.tfds_data_dir = ''               # '' = TFDS default (~/tensorflow_datasets)
  data.train_split = 'train'
  data.eval_split = 'validation'
  # (height, width) the image is resized into (aspect preserved), then padded to a multiple of
  # 2**max_level. Both must be multiples of 2**max_level.
  data.image_size = (832, 1344)
  data.augment_hflip = True             # augment_input_data: random horizontal flip only
  data.skip_crowd_during_training = True
  data.max_instances = 100              # ground-truth padding size
  data.gt_mask_size = 112               # GT masks cropped to the box at 112, stored (112+4)^2
  data.pixel_mean = (0.485, 0.456, 0.406)  # RGB in [0, 1]
  data.pixel_std = (0.229, 0.224, 0.225)
  data.keep_images_without_annotations_in_training = False
  # Host input pipeline (maskrcnn_jax.data.pipeline): decoding threads (0 = one per CPU core)
  # and batches prepared ahead of the consumer. The random-access pipeline shuffles each epoch
  # globally by index (no shuffle buffer).
  data.num_workers = 0
  data.prefetch_batches = 2

  # ---------------------------------------------------------------- model
  model = config.model = ml_collections.ConfigDict()
  model.num_classes = 91                # COCO category ids as class indices, 0 = background
  # float32, bfloat16 or float16: the compute dtype; parameters stay float32.
  model.precision = 'float32'
  # Kernel gradients of the convolutions (maskrcnn_jax.ops.conv): 'xla', 'matmul' (as matrix
  # products, much faster on the CPU) or 'auto' ('matmul' on the CPU backend, else 'xla').
  model.conv_kernel_grad = 'auto'
  # The products of the convolutions and dense layers at inference (evaluation, predict,
  # export, benchmark_inference): 'float32', or 'bfloat16' = bfloat16 operands accumulated in
  # float32, one matrix product per kernel tap (maskrcnn_jax.ops.conv.conv2d_products): the
  # CPU's fast path (its bfloat16 units): 1.3-1.7x float32 inference on 2 AMD EPYC cores, the same
  # demo AP (docs/performance.md); training is unchanged.
  model.inference_products = 'float32'
  # The same choice for the training step (forward and gradients: bfloat16 operands, float32
  # accumulation, as a TPU's default matmul precision): 1.24x float32 training on 2 AMD EPYC
  # cores with bfloat16 instructions, slower on CPUs without them (docs/performance.md). A CPU
  # option: on GPUs use model.precision. 'float32' keeps the torchvision parity.
  model.train_products = 'float32'

  backbone = model.backbone = ml_collections.ConfigDict()
  backbone.depth = 50                   # 18, 34, 50 or 101
  # Stages up to and including `freeze_at` are frozen: 1 = conv1, 2 = conv1 + res2 (reference).
  backbone.freeze_at = 2
  backbone.finetune_bn = False          # False: frozen batch norm everywhere (reference)
  backbone.bn_epsilon = 1e-4            # the reference's _BATCH_NORM_EPSILON (torchvision: 1e-5)
  backbone.bn_momentum = 0.997          # running-average decay, used with finetune_bn only
  # Also stop the gradient after the last frozen stage: a pure speed measure (the frozen
  # stages' backward is skipped); the freezing itself is the optimizer mask.
  backbone.stop_frozen_gradients = True

  model.min_level = 2
  model.max_level = 6
  model.fpn_channels = 256

  anchors = model.anchors = ml_collections.ConfigDict()
  # 'reference': size = anchor_scale * 2**level, (x_scale, y_scale) pairs, centre offset 0.5.
  # 'torchvision': explicit sizes per level, h/w ratios, offset 0, rounded half extents.
  anchors.convention = 'reference'
  anchors.num_scales = 1
  anchors.anchor_scale = 8.0
  anchors.aspect_ratios = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))
  anchors.sizes = (32, 64, 128, 256, 512)  # used by the 'torchvision' convention only
  anchors.offset = 0.5
  anchors.round_half_extents = False

  rpn = model.rpn = ml_collections.ConfigDict()
  rpn.positive_overlap = 0.7
  rpn.negative_overlap = 0.3
  rpn.allow_low_quality_matches = True
  rpn.low_quality_ties = False          # one anchor per GT (the reference); torchvision: all ties
  rpn.batch_size_per_image = 256
  rpn.fg_fraction = 0.5
  rpn.min_size = 0.0
  rpn.train_pre_nms_topk = 2000         # per level
  rpn.train_post_nms_topk = 1000
  rpn.train_nms_threshold = 0.7
  rpn.test_pre_nms_topk = 1000          # per level
  rpn.test_post_nms_topk = 1000
  rpn.test_nms_threshold = 0.7
  rpn.box_weights = (1.0, 1.0, 1.0, 1.0)
  rpn.huber_delta = 1.0 / 9.0
  rpn.box_loss_weight = 1.0
  rpn.box_loss_normalizer = 'positives_per_level'  # torchvision: 'sampled' (/ batch * 256)

  roi = model.roi = ml_collections.ConfigDict()
  roi.batch_size_per_image = 512
  roi.fg_fraction = 0.25
  roi.fg_threshold = 0.5
  roi.bg_threshold_hi = 0.5
  roi.bg_threshold_lo = 0.0
  roi.add_gt_as_proposals = True
  roi.box_weights = (10.0, 10.0, 5.0, 5.0)
  roi.pooler_size = 7
  roi.sampling_ratio = 2
  roi.aligned = False                   # the reference's crop_and_resize has no half-pixel shift
  roi.canonical_size = 224.0
  roi.canonical_level = 4
  roi.level_mapping_eps = 0.0           # torchvision adds 1e-6 inside floor(); the reference 0
  roi.mlp_head_dim = 1024
  roi.huber_delta = 1.0
  roi.box_loss_weight = 1.0
  roi.box_loss_normalizer = 'foreground'  # / 4 * foreground RoIs; torchvision: 'sampled' RoIs

  mask = model.mask = ml_collections.ConfigDict()
  mask.pooler_size = 14
  mask.resolution = 28
  mask.num_convs = 4
  mask.conv_dim = 256
  mask.loss_weight = 1.0
  # Init of the mask predictor's 1x1 logits conv: 0 = MSRA fill (He normal, fan-out: std
  # sqrt(2 / num_classes)), as the reference's mask_fcn_logits and torchvision's
  # MaskRCNNPredictor; > 0 = normal(std), Detectron / detectron2's 0.001.
  mask.predictor_init_std = 0.0
  # Mask targets thresholded at 0.5 (the reference's get_mask_targets) or left as the bilinear
  # fractions in [0, 1] (torchvision's project_masks_on_boxes: soft targets of the BCE).
  mask.binarize_targets = True
  # The mask head's RoIs in training: each image's first 128 RoI slots hold its sampled
  # foreground. 'fixed': all 128 (the reference's static shape); 'bucketed': the fewest of
  # 16/32/64/128 slots that hold the foreground of every image of the device batch, one branch
  # of a conditional per size (the same loss and gradients: the other slots weigh 0); 'auto':
  # bucketed on the CPU backend, fixed elsewhere (a GPU conditional costs a host sync).
  mask.train_slots = 'auto'

  test = model.test = ml_collections.ConfigDict()
  test.detections_per_image = 100
  test.nms_threshold = 0.5              # per class
  test.score_threshold = 0.0
  # (RoI, class) candidates kept by score before the per-class NMS, for static shapes (the
  # reference's pre_nms_num_detections).
  test.pre_nms_topk = 1000
  test.min_box_size = 0.0               # drop detections narrower/shorter (torchvision: 1e-2)

  # ---------------------------------------------------------------- initialisation
  # Weights loaded when a run starts without a checkpoint in its workdir (a resumed run ignores
  # them): torchvision state dicts (.pth with torch installed, .npz or .safetensors; nothing is
  # downloaded) or a checkpoint of ours. The reference starts from an ImageNet ResNet-50: e.g.
  # torchvision's resnet50 (IMAGENET1K_V1) file. A source with another model.num_classes (whole
  # Mask R-CNN or checkpoint) fills everything but the class-dependent layers (box classifier,
  # box regressor, mask predictor), which stay freshly initialised: fine-tuning to other classes
  # (configs/finetune_shapes.py).
  init = config.init = ml_collections.ConfigDict()
  init.torchvision_backbone = ''        # ImageNet resnet{depth} state dict
  init.torchvision_backbone_prefix = ''  # key prefix, e.g. 'backbone.body.' in a detection file
  init.torchvision_maskrcnn = ''        # a whole maskrcnn_resnet50_fpn (configs/torchvision_r50.py)
  # A workdir of ours (its latest checkpoint), or one step directory <workdir>/checkpoints/<step>:
  # its params and batch_stats only (no optimizer state; the run starts at step 0). The same
  # model except, optionally, num_classes. Not together with the torchvision_* keys.
  init.checkpoint = ''

  # ---------------------------------------------------------------- training
  train = config.train = ml_collections.ConfigDict()
  train.per_device_batch_size = 2       # train_batch_size (per GPU)
  train.learning_rate = 2.5e-3          # init_learning_rate
  train.warmup_steps = 1000
  train.warmup_learning_rate = 0.0
  train.learning_rate_steps = (480000, 640000)
  train.learning_rate_decay_factors = (0.1, 0.01)  # multiply learning_rate after each step above
  train.total_steps = 938240
  train.momentum = 0.9
  train.l2_weight_decay = 1e-4          # on weights, not on batch norm or biases
  train.bias_grad_multiplier = 2.0      # Detectron convention for biases and BN betas
  train.gradient_clip_norm = 0.0        # global_gradient_clip_ratio; <= 0 disables
  train.gradient_accumulation_steps = 1
  # 'per_device' (the reference under Horovod): each device normalises its losses over its own
  # batch, then the gradients are averaged, so the update depends on the number of devices;
  # 'global': every normaliser is averaged over the devices (and each image samples with its
  # global index), so the update is the global batch's, however the batch is split.
  train.loss_normalization = 'per_device'
  # float16 dynamic loss scaling (the reference's AMP): initial 2**12, x2 every 2000 finite steps.
  train.loss_scale_initial = 2.0 ** 12
  train.loss_scale_growth_interval = 2000
  train.checkpoint_every_steps = 2500   # save_checkpoints_steps
  train.max_checkpoints_to_keep = 5
  train.log_every_steps = 100
  # Resuming with a config that changes the state's structure or the data order (the model, batch,
  # schedule, seed, dataset, device count) is an error naming each key; True resumes knowingly.
  train.allow_config_changes = False

  # ---------------------------------------------------------------- evaluation
  evaluation = config.eval = ml_collections.ConfigDict()
  evaluation.per_device_batch_size = 8  # eval_batch_size
  evaluation.num_samples = 5000         # eval_samples
  evaluation.every_steps = 2500         # num_steps_per_eval
  evaluation.checkpoint_step = -1       # eval mode: -1 = the latest checkpoint
  # COCOeval engine: 'pycocotools' (the reference) or 'faster_coco_eval' (the same 12 + 12
  # stats, faster; docs/performance.md "COCO evaluation engines").
  evaluation.engine = 'pycocotools'

  # ---------------------------------------------------------------- benchmark
  # --config.mode=benchmark_train | benchmark_inference (maskrcnn_jax.train.benchmark, result in
  # <workdir>/<mode>.json) and bench/benchmark_{training,inference}.py: the reference's benchmark
  # scripts. Batch from train/eval.per_device_batch_size, canvas from data.image_size, precision
  # from model.precision. torchvision side by side is bench/'s (--torchvision), not a config key.
  benchmark = config.benchmark = ml_collections.ConfigDict()
  benchmark.num_steps = 200             # steps in all, warm-up included (the reference: 200)
  benchmark.warmup_steps = 100          # left out of the average (the reference: 100)
  benchmark.data = 'synthetic'          # 'synthetic' (no TensorFlow) or 'real' (prepared TFDS)
  benchmark.num_devices = 0             # local devices to use; 0 = all
  benchmark.peak_tflops = 0.0           # per-device peak for the MFU; 0 = by device kind

  return config
