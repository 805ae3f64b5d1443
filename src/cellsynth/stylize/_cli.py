"""``cellsynth stylize | stylize-dataset | train-style | import-token``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["register"]

_FMT = argparse.ArgumentDefaultsHelpFormatter


def _model_args(p) -> None:
    p.add_argument("--model", default="sd-v1-4",
                   help="Stable Diffusion v1: registry name, diffusers folder or .ckpt/.safetensors file")
    p.add_argument("--image-encoder", default="clip-vit-large-patch14",
                   help="CLIP image encoder (registry name or folder), when the model folder has none")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--offline", action="store_true", help="never download weights")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (minutes of compilation once; faster steps after, on a GPU)")


def _stylize_args(p) -> None:
    from .params import StylizeParams

    from .params import INST_SCHEDULERS

    d = StylizeParams()
    p.add_argument("--style", required=True, help="style image (TIFF, PNG, JPEG)")
    p.add_argument("--token", required=True, help="style token folder, or an official embeddings.pt")
    p.add_argument("--strength", type=float, default=d.strength, help="fraction of the diffusion run redone")
    p.add_argument("--steps", type=int, default=d.num_inference_steps, help="DDIM steps of a full run")
    p.add_argument("--guidance", type=float, default=d.guidance_scale, help="classifier-free guidance")
    p.add_argument("--size", type=int, default=d.size, help="long side of the working image (0: native)")
    p.add_argument("--resize", choices=("keep", "squash"), default=d.resize,
                   help="keep the aspect ratio, or squash to size x size as the official code")
    p.add_argument("--no-adain", action="store_true", help="skip the latent AdaIN")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the inversion noise")
    p.add_argument("--scheduler", choices=INST_SCHEDULERS, default=d.scheduler,
                   help="sampler: 'ddim' as the paper (50 steps), or the few-step 'dpmsolver++' / 'unipc' "
                   "(use --steps 20)")


def register(sub) -> None:
    p = sub.add_parser("stylize", help="stylize an image like a style image (InST)", formatter_class=_FMT,
                       description="Restyle CONTENT (e.g. a generated layout) like --style with a learned style "
                       "token: latent AdaIN, stochastic inversion, DDIM. Writes a TIFF in CONTENT's shape, "
                       "dtype and value range.")
    p.add_argument("content", help="content image (TIFF, PNG, JPEG)")
    _stylize_args(p)
    _model_args(p)
    p.add_argument("--out", required=True, help="output TIFF")
    p.add_argument("--overwrite", action="store_true", help="replace --out")
    p.add_argument("--json", action="store_true", help="print the provenance record as JSON")
    p.set_defaults(func=_stylize)

    p = sub.add_parser("stylize-dataset", help="stylize a layout dataset into a new one, with count QC",
                       formatter_class=_FMT,
                       description="Stylize every image of a layout dataset folder into OUT_DIR (same labels and "
                       "centres), resumably; each item records a QC count, its drift from the true count and "
                       "a keep flag.")
    p.add_argument("in_dir", help="layout dataset folder (manifest.json)")
    _stylize_args(p)
    _model_args(p)
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--tolerance", type=float, default=0.2, help="keep items with |count drift| <= this")
    p.add_argument("--qc-model", default="default", help="counter for QC: default, classic or a model path")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset with other settings in --out")
    p.add_argument("--dask-scheduler", default=None, metavar="local|ADDRESS",
                   help="stylize on dask.distributed: 'local' (a local cluster of processes, each loading the model "
                        "once) or the address of a running scheduler, e.g. tcp://host:8786 (default: in this "
                        "process; --scheduler is the sampler)")
    p.add_argument("--workers", type=int, default=None,
                   help="local dask worker processes (implies --dask-scheduler local; default: one per core)")
    p.set_defaults(func=_stylize_dataset)

    from .params import TrainParams

    d = TrainParams()
    p = sub.add_parser("train-style", help="learn a style token from style images", formatter_class=_FMT,
                       description="Train an InST style token (only the mapper learns) from one or more style "
                       "images. Checkpoints go to OUT/checkpoint; running the same command again resumes.")
    p.add_argument("styles", nargs="+", help="style images")
    _model_args(p)
    p.add_argument("--out", required=True, help="token folder")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.learning_rate, help="AdamW learning rate")
    p.add_argument("--size", type=int, default=d.size, help="training image side")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    p.add_argument("--no-cache", action="store_true", help="re-encode latents and embeddings every step")
    p.add_argument("--clip-input", choices=("proper", "official-quirk"), default=d.clip_input)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--overwrite", action="store_true", help="replace a token in --out")
    p.set_defaults(func=_train)

    p = sub.add_parser("import-token", help="import an official InST embeddings.pt safely", formatter_class=_FMT,
                       description="Read an official InST / InST-Microscopy embeddings.pt without executing pickle "
                       "code (unknown globals are refused) and save it as a token folder.")
    p.add_argument("file", help="official embeddings.pt")
    p.add_argument("--out", required=True, help="token folder")
    p.add_argument("--placeholder", default=None, help="placeholder word (default: the file's)")
    p.add_argument("--no-quirk", action="store_true",
                   help="give CLIP the proper image instead of the official uint8-cast input")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_import)


def read_image(path):
    """Read a TIFF with :func:`cellsynth.io.read_tiff`, other formats with scikit-image."""
    from .. import io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    if path.suffix.lower() in (".tif", ".tiff"):
        return io.read_tiff(path)
    return io.read_picture(path), {"pixel_size": None}


def _params(args):
    from .params import StylizeParams

    return StylizeParams(strength=args.strength, num_inference_steps=args.steps, guidance_scale=args.guidance,
                         size=args.size, resize=args.resize, adain=not args.no_adain, seed=args.seed,
                         scheduler=args.scheduler)


def _pipeline(args, callback):
    from .loading import load_pipeline

    return load_pipeline(args.model, image_encoder=args.image_encoder, device=args.device, dtype=args.dtype,
                         offline=True if args.offline else None, progress=callback, cache=False,
                         compile=getattr(args, "compile", False))


def _stylize(args) -> int:
    from .. import io
    from ..progress import tqdm_callback
    from .official import read_token

    from .._provenance import record, sidecar, vars_of, write_sidecar

    params = _params(args)
    io.prepare_output(args.out, overwrite=args.overwrite)
    io.prepare_output(sidecar(args.out), overwrite=args.overwrite)
    content, meta = read_image(args.content)
    style, _ = read_image(args.style)
    _check_images(content, style)
    token = read_token(args.token)
    callback, close = tqdm_callback()
    try:
        pipe = _pipeline(args, callback)
        out = pipe(content, style, token, params=params, progress=callback)
    finally:
        close()
    io.write_tiff(args.out, out.image, pixel_size=meta.get("pixel_size"), overwrite=args.overwrite)
    from .loading import model_record

    info = {**out.metadata, **model_record(args.model), "content": str(args.content), "style": str(args.style),
            "out": str(args.out)}
    write_sidecar(args.out, record("stylize", inputs=[args.content, args.style, args.token],
                                   model=model_record(args.model), parameters=vars_of(args),
                                   pixel_size=meta.get("pixel_size"), result=out.metadata), overwrite=args.overwrite)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        print(f"wrote {args.out} ({out.metadata['denoising_steps']} DDIM steps from t={out.metadata['t_start']})")
    return 0


#: Dtypes a stylized TIFF can keep (the output has the content's dtype).
_WRITABLE = ("uint8", "uint16", "float32", "int32", "uint32")


def _check_images(content, style) -> None:
    """Shape, dtype and values of the content and style images, before any model is loaded."""
    from ._image import to_unit_rgb

    for name, image in (("content", content), ("style", style)):
        try:
            to_unit_rgb(image)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{name} image: {exc}") from None
    if content.dtype.name not in _WRITABLE:
        raise TypeError(f"content image has dtype {content.dtype}, but the result keeps the content's dtype and a "
                        f"TIFF is written as one of {', '.join(_WRITABLE)}; convert the content first")


def _stylize_dataset(args) -> int:
    from ..io import read_json
    from ..progress import tqdm_callback
    from .dataset import stylize_dataset
    from .official import read_token

    from .dataset import qc_counter

    params = _params(args)
    style, _ = read_image(args.style)
    _check_images(np.zeros((2, 2), np.uint8), style)
    token = read_token(args.token)
    qc_counter(args.qc_model)  # a misspelt --qc-model fails here, not after loading the model
    from .._cluster import cluster_args

    cluster = cluster_args(args.dask_scheduler, args.workers)
    callback, close = tqdm_callback()
    try:
        if cluster:  # each worker loads the pipeline once
            pipe = dict(model=args.model, image_encoder=args.image_encoder, device=args.device, dtype=args.dtype,
                        offline=True if args.offline else None, compile=bool(getattr(args, "compile", False)))
        else:
            pipe = _pipeline(args, callback)
        manifest = stylize_dataset(args.in_dir, args.out, pipe=pipe, token=token, style=style, params=params,
                                   tolerance=args.tolerance, qc_model=args.qc_model, limit=args.limit,
                                   overwrite=args.overwrite, progress=callback, **cluster)
    finally:
        close()
    qc = read_json(manifest).get("qc", {})
    print(f"wrote {manifest.parent}: {qc.get('kept', 0)} kept, {qc.get('rejected', 0)} rejected "
          f"(mean |count drift| {qc.get('mean_abs_drift', 0):.1%})")
    return 0


def _train(args) -> int:
    from ..progress import tqdm_callback
    from .params import TrainParams
    from .tokens import save_token
    from .train import train_token

    params = TrainParams(steps=args.steps, learning_rate=args.lr, size=args.size, flip=not args.no_flip,
                         cache=not args.no_cache, clip_input=args.clip_input,
                         checkpoint_every=args.checkpoint_every, seed=args.seed)
    out = Path(args.out)
    if (out / "token.json").exists() and not args.overwrite:
        raise FileExistsError(f"{out} already holds a style token; pass --overwrite to replace it")
    styles = [read_image(s)[0] for s in args.styles]
    callback, close = tqdm_callback()
    try:
        pipe = _pipeline(args, callback)
        result = train_token(styles, pipe, params=params, encoder=str(args.image_encoder),
                             checkpoint_dir=out / "checkpoint", progress=callback)
    finally:
        close()
    save_token(result.token, out, overwrite=True)
    print(f"wrote token {out} (final loss {result.token.training['final_loss']:.4f}, "
          f"{result.seconds_per_step:.3f} s/step)", file=sys.stdout)
    return 0


def _import(args) -> int:
    from .official import import_official_token
    from .tokens import save_token

    token = import_official_token(args.file, placeholder=args.placeholder, quirk=not args.no_quirk)
    folder = save_token(token, args.out, overwrite=args.overwrite)
    print(f"imported {args.file} -> {folder} (placeholder {token.placeholder!r}, CLIP input {token.clip_input})")
    return 0
