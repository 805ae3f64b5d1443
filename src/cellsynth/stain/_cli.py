"""``cellsynth nsc | stain | simulate-stain-pairs | train-stain | evaluate-stain``."""

from __future__ import annotations

import argparse
import json
import sys

from .params import BACKBONES, FOREGROUND_MODES, PRESETS, SCHEDULERS

__all__ = ["register"]

_FMT = argparse.ArgumentDefaultsHelpFormatter


def _on_off(value: str) -> bool:
    v = value.strip().lower()
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def register(sub) -> None:
    p = sub.add_parser("nsc", help="NSC structure masks of an image (neural spectral clustering)",
                       description="Cluster an image's patch features (filter bank or DINO) with a joint spectral "
                       "embedding and a shared anchor; write a mask (or all cluster labels) as a TIFF. A (C, M, N) "
                       "image gives one mask per channel.", formatter_class=_FMT)
    p.add_argument("image", help="input TIFF, (M, N) or (C, M, N)")
    p.add_argument("--out", required=True, help="output labels TIFF (uint8)")
    p.add_argument("--channel", type=int, default=None, help="only this channel of a (C, M, N) image")
    p.add_argument("--k", type=int, default=5, help="clusters")
    p.add_argument("--r", type=int, default=5, help="eigenvectors")
    p.add_argument("--fov", type=int, default=112, help="field-of-view side in pixels")
    p.add_argument("--backbone", choices=BACKBONES, default="filters", help="patch features")
    p.add_argument("--foreground", choices=FOREGROUND_MODES, default="auto",
                   help="'all' writes cluster labels 1..k (darkest first), otherwise a 0/1 mask")
    p.add_argument("--weights", default=None, help="local folder of the DINO backbone's weights (default: the "
                   "registry model, from the hub cache or downloaded)")
    p.add_argument("--device", default="auto", help="device of DINO backbones")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_nsc)

    p = sub.add_parser("stain", help="virtual fluorescence channels from brightfield planes",
                       description="Run the staining pipeline on a (B, M, N) brightfield TIFF; write a (C, M, N) "
                       "float32 TIFF of normalised intensities in [0, 1].", formatter_class=_FMT)
    p.add_argument("image", help="brightfield TIFF, (B, M, N)")
    p.add_argument("--out", required=True, help="output TIFF (C, M, N)")
    _sampling_args(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_stain)

    p = sub.add_parser("simulate-stain-pairs", help="write simulated brightfield / fluorescence pairs",
                       description="Render N fields of view of simulated cells as 3 brightfield planes and 5 "
                       "fluorescence channels (DNA, ER, RNA, AGP, Mito) in the training folder layout.",
                       formatter_class=_FMT)
    p.add_argument("--n", type=int, required=True, help="fields of view")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("ROWS", "COLS"))
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("train-stain", help="train a staining model on paired folders of TIFFs",
                       description="Train a conditional diffusion UNet (brightfield planes -> fluorescence "
                       "channels). DATA_DIR holds one folder per field of view with brightfield/ and "
                       "fluorescence/ TIFFs (order from the sorted file names). Every epoch is saved; "
                       "--resume continues.", formatter_class=_FMT)
    p.add_argument("data", help="paired-data folder")
    p.add_argument("--out", required=True, help="model folder")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--steps-per-epoch", type=int, default=0, help="0: one crop per field of view")
    p.add_argument("--preset", choices=PRESETS, default="fast",
                   help="'fast': 64-pixel crops, batch 8, lr 8e-5; 'paper': DiffStain's 512-pixel crops, batch 1, "
                   "lr 5e-4 (for a GPU). --crop, --batch-size and --lr override it")
    p.add_argument("--batch-size", type=int, default=None, help="(preset: fast 8, paper 1)")
    p.add_argument("--crop", type=int, default=None, help="(preset: fast 64, paper 512)")
    p.add_argument("--lr", type=float, default=None, help="(preset: fast 8e-5, paper 5e-4)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--save-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--block-out-channels", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--layers-per-block", type=int, default=2)
    p.add_argument("--norm-num-groups", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample"), default="epsilon")
    p.add_argument("--timesteps", type=int, default=2000, help="training schedule length")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate-stain", help="MSE, MAE, PCC and SSIM of a staining model on paired data",
                       description="Stain every field of view of DATA_DIR and compare with its fluorescence "
                       "channels on the model's normalised [0, 1] scale.", formatter_class=_FMT)
    p.add_argument("data", help="paired-data folder")
    _sampling_args(p)
    p.add_argument("--limit", type=int, default=None, help="only the first N fields of view")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=_evaluate)


def _sampling_args(p) -> None:
    p.add_argument("--model", default="default", help="model folder, or 'default' (the shipped demo model)")
    p.add_argument("--preset", choices=PRESETS, default="fast",
                   help="'fast': 10 DDIM steps, no mask guidance, filter-bank NSC; 'paper': DiffStain as published "
                   "(full DDPM schedule, mask guidance with refinement, 512 tiles, DINO ViT-S/8 NSC masks; for a "
                   "GPU). The options below override the preset's values")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (preset: fast 10)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="sampler (preset: fast ddim, paper ddpm)")
    p.add_argument("--guidance", type=_on_off, default=None, metavar="on|off",
                   help="NSC mask guidance (preset: fast off, paper on)")
    p.add_argument("--strength", type=float, default=None, help="mask guidance start (fraction of the schedule)")
    p.add_argument("--refine", type=int, default=None, help="guided rounds (preset: fast 1, paper 2)")
    p.add_argument("--tile", type=int, default=None, help="tile size (0: the model's sample size; paper 512)")
    p.add_argument("--nsc-backbone", choices=BACKBONES, default=None,
                   help="features of the guidance masks (preset: fast filters, paper dino-vits8)")
    p.add_argument("--nsc-weights", default=None, help="local folder of the DINO backbone's weights (default: the "
                   "registry model, from the hub cache or downloaded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def _params(args):
    """The preset's StainParams and NSCParams with the options given on the command line."""
    import dataclasses

    from .params import stain_preset

    params, nsc = stain_preset(args.preset)
    given = {"steps": args.steps, "scheduler": args.scheduler, "guidance": args.guidance,
             "guidance_strength": args.strength, "refine": args.refine, "tile": args.tile, "seed": args.seed}
    params = dataclasses.replace(params, **{k: v for k, v in given.items() if v is not None})
    if args.nsc_backbone is not None:
        nsc = dataclasses.replace(nsc, backbone=args.nsc_backbone)
    return params, nsc


def _guidance_backbone(params, nsc, args):
    """The NSC backbone of mask guidance, built once (None without guidance)."""
    if not params.guidance:
        return None
    from .features import make_backbone

    return make_backbone(nsc.backbone, device=args.device, weights=args.nsc_weights)


def _nsc(args) -> int:
    import numpy as np

    from .. import io
    from ..progress import tqdm_callback
    from .features import make_backbone
    from .nsc import nsc_masks
    from .params import NSCParams

    from .._provenance import record, sidecar, vars_of, write_sidecar

    params = NSCParams(k=args.k, r=args.r, fov=args.fov, backbone=args.backbone, foreground=args.foreground)
    io.prepare_output(args.out, overwrite=args.overwrite)
    io.prepare_output(sidecar(args.out), overwrite=args.overwrite)
    image, meta = io.read_tiff(args.image)
    image = _colour_planes(image, meta, args)
    if image.ndim == 3 and args.channel is not None:
        if not 0 <= args.channel < image.shape[0]:
            raise ValueError(f"--channel must be in [0, {image.shape[0] - 1}], got {args.channel}")
        image = image[args.channel]
    elif image.ndim == 2 and args.channel not in (None, 0):
        raise ValueError(f"--channel {args.channel} does not exist: {args.image} has one channel (use 0, or leave "
                         "--channel out)")
    if image.ndim not in (2, 3):
        raise ValueError(f"{args.image} has shape {image.shape}; expected (M, N) or (C, M, N)")
    backbone = make_backbone(params.backbone, device=args.device, weights=args.weights)
    callback, close = tqdm_callback()
    try:
        planes = image[None] if image.ndim == 2 else image
        masks = [nsc_masks(p, params=params, backbone=backbone, progress=callback).mask for p in planes]
    finally:
        close()
    out = np.stack(masks) if image.ndim == 3 else masks[0]
    io.write_tiff(args.out, out.astype(np.uint8), pixel_size=meta.get("pixel_size"), overwrite=args.overwrite)
    write_sidecar(args.out, record("nsc", inputs=[args.image] + ([args.weights] if args.weights else []),
                                   model={"backbone": backbone.name}, parameters=vars_of(args),
                                   pixel_size=meta.get("pixel_size")), overwrite=args.overwrite)
    print(f"wrote {args.out} ({backbone.name} features, k={params.k}, foreground={params.foreground})")
    return 0


def _colour_planes(image, meta: dict, args):
    """An RGB(A) image (samples last, as TIFF stores colour) -> its luminance, or one colour with --channel."""
    if not (image.ndim == 3 and str(meta.get("axes", "")).endswith("S") and image.shape[-1] in (3, 4)):
        return image
    kind = "RGBA" if image.shape[-1] == 4 else "RGB"
    if args.channel is not None:
        if not 0 <= args.channel < image.shape[-1]:
            raise ValueError(f"--channel must be in [0, {image.shape[-1] - 1}] for an {kind} image, got {args.channel}")
        print(f"note: {args.image} is an {kind} colour image; NSC runs on its colour {args.channel}", file=sys.stderr)
        out = image[..., args.channel]
        args.channel = None
        return out
    from skimage.color import rgb2gray

    alpha = " (alpha ignored)" if kind == "RGBA" else ""
    print(f"note: {args.image} is an {kind} colour image; NSC runs on its luminance{alpha}", file=sys.stderr)
    return rgb2gray(image[..., :3])


def _stain(args) -> int:
    from .. import io
    from ..progress import tqdm_callback
    from .pipeline_stain import load_stain_model

    from .._provenance import record, sidecar, vars_of, write_sidecar

    params, nsc = _params(args)
    io.prepare_output(args.out, overwrite=args.overwrite)
    io.prepare_output(sidecar(args.out), overwrite=args.overwrite)
    image, meta = io.read_tiff(args.image)
    pipe = load_stain_model(args.model, device=args.device)
    backbone = _guidance_backbone(params, nsc, args)
    callback, close = tqdm_callback()
    try:
        out = pipe(image, params=params, nsc_params=nsc, backbone=backbone, progress=callback)
    finally:
        close()
    io.write_tiff(args.out, out.images, pixel_size=meta.get("pixel_size"), channel_names=out.channel_names,
                  overwrite=args.overwrite)
    write_sidecar(args.out, record("stain", inputs=[args.image], model=getattr(pipe, "source", None),
                                   parameters=vars_of(args), pixel_size=meta.get("pixel_size"),
                                   result={"channels": list(out.channel_names)}), overwrite=args.overwrite)
    guided = f", mask guidance with {nsc.backbone} NSC masks" if params.guidance else ""
    print(f"wrote {args.out}: channels {', '.join(out.channel_names)} (preset {args.preset}, {params.scheduler}{guided})")
    return 0


def _simulate(args) -> int:
    from ..progress import tqdm_callback
    from .simulate import simulate_stain_pairs

    callback, close = tqdm_callback()
    try:
        out = simulate_stain_pairs(args.out, args.n, seed=args.seed, shape=tuple(args.size), overwrite=args.overwrite,
                                   progress=callback)
    finally:
        close()
    print(f"wrote {args.n} pairs to {out}")
    return 0


def _train(args) -> int:
    from ..progress import tqdm_callback
    from .train import TrainConfig, train_stain

    model = {"block_out_channels": args.block_out_channels, "layers_per_block": args.layers_per_block,
             "norm_num_groups": args.norm_num_groups, "dropout": args.dropout,
             "prediction_type": args.prediction_type, "num_train_timesteps": args.timesteps}
    preset = _TRAIN_PRESETS[args.preset]
    pick = (lambda name: preset[name] if getattr(args, name) is None else getattr(args, name))  # noqa: E731
    cfg = TrainConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=pick("batch_size"),
                      crop=pick("crop"), lr=pick("lr"), ema_decay=args.ema_decay, seed=args.seed, minutes=args.minutes,
                      device=args.device, save_dtype=args.save_dtype, model=model)
    callback, close = tqdm_callback()
    try:
        res = train_stain(args.data, args.out, config=cfg, resume=args.resume, progress=callback)
    finally:
        close()
    print(f"trained {res.steps} steps ({len(res.losses)} epochs, {res.seconds / 60:.1f} min); "
          f"last loss {res.losses[-1]:.4f}; model in {res.out}")
    return 0


#: Training settings of the presets: ours for CPUs, and DiffStain's (512-pixel crops, batch 1, lr 5e-4).
_TRAIN_PRESETS = {"fast": {"crop": 64, "batch_size": 8, "lr": 8e-5},
                  "paper": {"crop": 512, "batch_size": 1, "lr": 5e-4}}


def _evaluate(args) -> int:
    from ..progress import tqdm_callback
    from .metrics import evaluate_stain
    from .pipeline_stain import load_stain_model

    params, nsc = _params(args)
    pipe = load_stain_model(args.model, device=args.device)
    backbone = _guidance_backbone(params, nsc, args)
    callback, close = tqdm_callback(disable=False)
    try:
        res = evaluate_stain(args.data, pipe, params=params, limit=args.limit, progress=callback, nsc_params=nsc,
                             backbone=backbone)
    finally:
        close()
    if args.json:
        print(json.dumps({"average": res["average"], "channels": res["channels"], "n": res["n"]}))
        return 0
    names = list(res["channels"])
    print(f"{'':10s} {'MSE':>8s} {'MAE':>8s} {'PCC':>8s} {'SSIM':>8s}")
    for name in ["average"] + names:
        m = res["average"] if name == "average" else res["channels"][name]
        print(f"{name:10s} {m['mse']:8.4f} {m['mae']:8.4f} {m['pcc']:8.3f} {m['ssim']:8.3f}")
    print(f"({res['n']} fields of view)", file=sys.stderr)
    return 0
