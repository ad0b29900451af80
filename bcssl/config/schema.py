"""Every configuration key of a run, with its default.

Defaults follow the paper's ImageNet DINO recipe (docs/recipe.md section 2) so that a preset only states
what it changes; small-data presets override what the short-run regime needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

#: mixed-precision modes a config may name (``train.amp``, ``detection.amp``); engine/amp.py applies them
AMP_MODES = ("none", "bf16", "fp16")
#: experiment trackers ``log.backends`` may name (engine/trackers.py); wandb and mlflow are extras
LOG_BACKENDS = ("tensorboard", "csv", "wandb", "mlflow")


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = "runs"  # run directory = <dir>/<name>


@dataclass
class CanvasConfig:
    """``data.name=fashion_mnist_canvas`` (bcssl/data/canvas.py): each Fashion-MNIST item on its own canvas."""
    size: int = 64  # canvas side (px)
    scale: List[float] = field(default_factory=lambda: [1.0, 2.0])  # item side / 28 px: 28-56 px
    clutter: int = 0  # fragments of other items scattered around the item
    seed: int = 0  # which canvases (positions, scales, clutter); train and test always differ


@dataclass
class DataConfig:
    # fashion_mnist | fashion_mnist_canvas | image_folder | webdataset | cifar10 | cifar100 | stl10
    name: str = "fashion_mnist"
    root: Optional[str] = None  # None: the dataset's default location
    split: str = "train"
    eval_split: str = "test"  # the split k-NN queries come from ("val" for ImageNet folders)
    download: bool = False
    limit: Optional[int] = None  # use only the first N training images
    workers: int = 4
    # image_folder: pre-train on the images listed in this text file (one path per line, relative to
    # data.root) instead of the folder; unlabelled, like a flat folder
    file_list: Optional[str] = None
    # image_folder: the loader decodes each batch of JPEG bytes on the training device
    # (torchvision.io.decode_jpeg; nvJPEG on CUDA) and cuts the crops there, instead of PIL in the workers
    decode_on_device: bool = False
    canvas: CanvasConfig = field(default_factory=CanvasConfig)
    # webdataset (tar shards, pre-training only): the shards as brace patterns, space separated
    # ("/data/train-{000000..001023}.tar"); the number of samples in the set (an epoch's length; counted
    # from local shards when null); the per-worker sample shuffle buffer
    urls: Optional[str] = None
    num_samples: Optional[int] = None
    shuffle_buffer: int = 1000


@dataclass
class ModelConfig:
    name: str = "bcssl_t"
    # None = the model's own default: 9 and bn+ln (BN after DW, the paper) for bcssl_*, 7 and ln for
    # convnext_t; ResNet/ViT/Swin have no depthwise conv and take neither.
    kernel_size: Any = None  # int or one per stage
    dw_norm: Optional[str] = None  # bn+ln (paper) | ln (vanilla ConvNeXt) | bn
    stem_stride: int = 4
    drop_path_rate: float = 0.1  # student only; DINO builds the teacher without drop path
    depths: Optional[List[int]] = None  # override the variant's (tiny custom models)
    dims: Optional[List[int]] = None
    # ResNet-50 only: zero-init the last BN of every block (BYOL's and MoCo v3's init); None/false:
    # torchvision's init (DINO, CARE)
    zero_init_last: Optional[bool] = None


@dataclass
class DINOConfig:
    """``method.dino.*`` (methods/dino.py; facebookresearch/dino main_dino.py argument names)."""
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = False  # the paper removes the last-layer normalisation for stability
    use_bn_in_head: bool = False
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    # DINO's successors, optional (the paper's DINO: centre, 0): centring = centre (EMA of the teacher's
    # batch mean) | sinkhorn_knopp (DINOv2: the teacher's batch balanced over the prototypes);
    # koleo_weight > 0 adds DINOv2's KoLeo regulariser on the student's global-view features (DINOv2: 0.1)
    centering: str = "centre"
    koleo_weight: float = 0.0
    momentum_teacher: float = 0.996  # EMA base, cosine -> 1
    freeze_last_layer: int = 1  # epochs during which the head's last layer gets no update


@dataclass
class BYOLConfig:
    """``method.byol.*`` (methods/byol.py; deepmind-research/byol)."""
    momentum: float = 0.996  # base_target_ema, cosine -> 1 (BYOL: 0.996 for 1000 epochs, 0.99 for 300)
    proj_hidden_dim: int = 4096  # hidden width of the projector and predictor MLPs
    proj_dim: int = 256  # projector / predictor output


@dataclass
class MoCoV3Config:
    """``method.moco_v3.*`` (methods/moco_v3.py; facebookresearch/moco-v3 main_moco.py)."""
    momentum: float = 0.99  # --moco-m, cosine -> 1 (--moco-m-cos)
    temperature: float = 1.0  # --moco-t: 1.0 for ResNet, 0.2 for ViT
    proj_hidden_dim: int = 4096  # --moco-mlp-dim
    proj_dim: int = 256  # --moco-dim
    proj_layers: Optional[int] = None  # projector depth; None: 3 for a transformer (MoCo_ViT), 2 otherwise
    stop_grad_conv1: bool = False  # --stop-grad-conv1: the patch projection frozen at its random init (ViT)


@dataclass
class CAREConfig:
    """``method.care.*`` (methods/care.py; ChongjianGE/CARE models/care_module.py, resnet_care.py,
    trans.py)."""
    momentum: float = 0.99  # param_momentum, cosine -> 1
    proj_hidden_dim: int = 4096  # hidden_dim of the projector / predictor MLPs
    proj_dim: int = 256  # low_dim
    lambda_fea: float = 100.0  # weight of the T -> C supervision
    # T-stream = TransStack(dim=stage-3 width, fmap_size, dim_out=last-stage width, proj_factor,
    # downsample, heads, num_layers=blocks, dim_head, rel_pos_emb=False)
    blocks: int = 5
    heads: int = 4
    dim_head: int = 128
    proj_factor: int = 4
    fmap_size: int = 14  # side of the stage-3 map (224 px / 16); its absolute position embedding's size
    downsample: bool = True  # the first block halves the map (stride-2 shortcut, 2x2 pool after attention)


#: method name -> its section's dataclass (``method.<name>.*``)
METHOD_SECTIONS = {"dino": DINOConfig, "byol": BYOLConfig, "moco_v3": MoCoV3Config, "care": CAREConfig}


@dataclass
class MethodConfig:
    """``method.name`` picks the method; only its own section (``method.<name>.*``) may be set."""
    name: str = "dino"
    dino: DINOConfig = field(default_factory=DINOConfig)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    moco_v3: MoCoV3Config = field(default_factory=MoCoV3Config)
    care: CAREConfig = field(default_factory=CAREConfig)


@dataclass
class CropsConfig:
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: List[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: List[float] = field(default_factory=lambda: [0.05, 0.4])
    flip_p: float = 0.5
    jitter: List[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: List[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_p: List[float] = field(default_factory=lambda: [0.0, 0.2, 0.0])
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class TrainConfig:
    epochs: int = 100
    # the run's length in optimisation steps instead (None: epochs x steps per epoch); every
    # schedule spans it and the last epoch ends early (bcssl demo sets it from its time budget)
    steps: Optional[int] = None
    batch_size: int = 64  # per process; the global batch is batch_size x world size
    lr: float = 5e-4  # at a global batch of 256: lr = lr * global_batch / 256 (DINO)
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    optimizer: str = "adamw"  # adamw | lars (MoCo v3 / BYOL ResNet recipes) | sgd (engine/optim.py)
    momentum: float = 0.9  # lars / sgd momentum
    clip_grad: float = 3.0  # per-parameter gradient-norm clip (DINO); 0 disables
    amp: str = "none"  # none | bf16 | fp16 (fp16 uses a grad scaler, CUDA only)
    channels_last: bool = True
    compile: bool = False  # torch.compile the student's backbone and head in place (nn.Module.compile)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager / eager: no code generation)
    checkpoint_every_steps: int = 500  # plus one at every epoch end
    log_every_steps: int = 20
    max_nonfinite_steps: int = 20  # this many non-finite losses in a row stop the run
    progress: bool = True


@dataclass
class EvalDataConfig:
    """What the evaluations read when they differ from the pre-training data (image folders)."""
    root: Optional[str] = None  # a labelled ImageFolder (class folders); None: data.root
    # DINO's evaluation transform of the original image (eval_knn.py / eval_linear.py):
    # Resize(resize_size) of the shorter side (bicubic) + CenterCrop(crop_size); image folders only
    resize_size: int = 256
    crop_size: int = 224


@dataclass
class EvalConfig:
    knn_every: int = 20  # epochs between k-NN monitor evaluations (0: only at the end)
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_train_limit: Optional[int] = None  # subsample the memory bank for a cheap monitor
    knn_test_limit: Optional[int] = None
    batch_size: int = 256
    final_knn: bool = True
    # the network every evaluation uses: auto (the method's paper: DINO's teacher, the online
    # encoder of BYOL / MoCo v3 / CARE), student (the optimised one) or teacher (the EMA one)
    encoder: str = "auto"
    data: EvalDataConfig = field(default_factory=EvalDataConfig)


@dataclass
class LinearConfig:
    """Linear probe (bcssl/eval/linear.py; facebookresearch/dino eval_linear.py): frozen eval-mode
    backbone, one ``nn.Linear`` on its ``linear_features`` (ViT: class tokens of the last 4 blocks;
    CNNs / Swin: the pooled features), SGD, cosine lr to 0 over the epochs (stepped per epoch)."""
    # auto: dino_eval_linear on image folders, cached_features on in-memory sets (Fashion-MNIST,
    # CIFAR, STL: 100 augmented epochs through the backbone cost hours on a CPU for ~0 gain at 28 px)
    # dino_eval_linear: DINO's protocol (RandomResizedCrop + flip every step, all processes,
    # evaluated every epoch, best and last reported, resumable); cached_features: the fast probe on
    # features extracted once with the evaluation preprocessing and cached per checkpoint
    protocol: str = "auto"
    epochs: int = 100
    lr: float = 0.001  # at a batch of 256: lr = lr * batch_size / 256 (DINO's eval_linear)
    batch_size: int = 256  # all processes together (DINO: 128 per GPU x 8 = 1024)
    momentum: float = 0.9
    weight_decay: float = 0.0
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # dino_eval_linear: crop area range
    normalize_features: bool = False  # standardise with train mean/std (folded into the saved layer)
    train_limit: Optional[int] = None  # use only the first N training / evaluation images
    test_limit: Optional[int] = None
    cache: bool = True  # cache eval features under <run_dir>/cache (keyed by checkpoint bytes)
    checkpoint_every_steps: int = 500  # dino_eval_linear: plus one at every epoch end (<run>/linear/)


@dataclass
class RobustnessConfig:
    """``bcssl eval robustness`` (bcssl/eval/robustness.py): corruptions made on the fly from
    ``data.eval_split``, or a released ImageNet-C / -A / -R / -Sketch folder."""
    folder: Optional[str] = None  # a released folder (class folders named by wnid); None: on the fly
    kind: Optional[str] = None  # imagenet_c | imagenet_a | imagenet_r | imagenet_sketch (with folder)
    corruption_limit: Optional[int] = 1000  # on the fly: images of the eval split (None = all; ~3 ms each x 75 cells)
    folder_limit: Optional[int] = None  # released folders: every image unless set (per folder)
    sampling: str = "auto"  # a limited subset: first | strided (auto: strided for folders, first on the fly)
    corruptions: Optional[List[str]] = None  # None: all 15
    severities: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])


@dataclass
class CamConfig:
    """``bcssl eval cam`` (bcssl/eval/cam.py): a Grad-CAM / Eigen-CAM grid of the run."""
    methods: List[str] = field(default_factory=lambda: ["gradcam", "eigencam"])
    images: Optional[str] = None  # an image file or folder; None: one eval image per class
    n_images: int = 8  # default images (one per class)


@dataclass
class ThroughputConfig:
    """``bcssl eval throughput`` (bcssl/eval/throughput.py): the run's backbone, forward only."""
    resolution: int = 224  # the paper's Table 3 (224 px)
    batch_size: int = 64
    amp: str = "none"
    channels_last: bool = False
    compare_unfolded: bool = True  # BC-SSL: measure the unfolded backbone too
    warmup: int = 3
    iters: int = 10
    repeats: int = 3


@dataclass
class DetectionConfig:
    """Mask R-CNN + FPN transfer (bcssl/eval/detection.py): the 3x recipe of Swin / ConvNeXt's
    mmdetection configs (docs/recipe.md section 5, detection transfer)."""
    root: Optional[str] = None  # COCO layout: train2017/, val2017/, annotations/instances_*2017.json
    train_images: Optional[str] = None  # each of these four overrides its place under root
    train_annotations: Optional[str] = None
    val_images: Optional[str] = None
    val_annotations: Optional[str] = None
    epochs: int = 36
    lr_steps: List[int] = field(default_factory=lambda: [27, 33])  # lr x0.1 after these epochs
    lr: float = 1.0e-4  # AdamW
    weight_decay: float = 0.05
    batch_size: int = 16  # images per step, all processes together
    warmup_iters: int = 500  # linear warm-up from warmup_ratio x lr
    warmup_ratio: float = 0.001
    min_size: List[int] = field(default_factory=lambda: [480, 800])  # training shorter side range (step 32)
    max_size: int = 1333
    test_size: int = 800
    drop_path_rate: float = 0.2
    rpn_post_nms_top_n_train: int = 1000  # proposals kept per image in training (mmdetection's Mask R-CNN)
    box_batch_size_per_image: int = 512  # RoIs sampled per image for the box / mask heads
    detections_per_img: int = 100  # kept per image at test time
    amp: str = "none"  # none | bf16 | fp16 (CUDA, with a grad scaler; the mmdetection configs train in fp16)
    workers: int = 4
    checkpoint_every_steps: int = 1000  # plus one at every epoch end


@dataclass
class DemoConfig:
    """``bcssl demo``: a wall-clock budget for the whole command (baselines, training, evaluation,
    report). The demo times its first training steps and sets ``train.steps`` to fill the budget."""
    budget_min: Optional[float] = None  # None: train for train.epochs, whatever the time
    probe_steps: int = 6  # training steps timed to measure the speed (the first one is not counted)
    margin: float = 0.05  # fraction of the budget kept free for the speed varying during the run


@dataclass
class LogConfig:
    """Where metrics go besides metrics.jsonl (bcssl/engine/trackers.py)."""
    backends: List[str] = field(default_factory=lambda: ["tensorboard", "csv"])  # + wandb, mlflow (extras)
    wandb_project: str = "bcssl"
    wandb_entity: Optional[str] = None
    wandb_mode: Optional[str] = None  # online | offline; None: $WANDB_MODE, else online when logged in, else offline
    mlflow_uri: Optional[str] = None  # tracking URI; None: the local file store <run.dir>/mlruns
    mlflow_experiment: str = "bcssl"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None  # torch.set_num_threads on CPU (None: torch's default)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    throughput: ThroughputConfig = field(default_factory=ThroughputConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    log: LogConfig = field(default_factory=LogConfig)
