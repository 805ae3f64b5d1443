"""One GPU check: full-size models built from their published configs (random weights, no download).

Prints one JSON table with, for each stage, seconds and peak GPU memory:

- ``inst_ddim50`` / ``inst_fast``: InST stylization of a 512x512 image with SD v1.4 (UNet, VAE, CLIP
  text encoder from the configs shipped in the package) and CLIP ViT-L/14, fp16, the paper's
  DDIM-50 and DPM-Solver++ at 20 steps, SDPA attention, channels-last (``--compile`` adds torch.compile);
- ``token_100_steps``: 100 steps of style-token training at 512x512 (float32 mapper, fp16 frozen
  models, GradScaler), with the time 1000 steps would take;
- ``stain_ddim50``: DiffStain 512x512, 5 channels, DDIM-50, the public code's UNet size;
- ``nsc_dinov2``: NSC masks of a 512x512 image on DINOv2-small features;
- ``count_4096``: the shipped default counter on a 4096x4096 image.

Goals on one H100-class GPU: InST <= 0.4 s (fast) and <= 1.2 s (DDIM-50) under 4 GB; 1000 token steps
<= 4 min; DiffStain <= 2 s; counter <= 0.5 s. The weights are random, so the times are those of
the real models; the images are not meaningful.

Without a CUDA GPU it says so and exits with status 2. ``--build-only`` builds every full-size
model on the meta device (no memory, no GPU) and prints their parameter counts; ``--tiny`` runs
every stage with tiny models on the CPU (checks the script itself).

Run: ``python benchmarks/gpu_check.py [--compile] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

CLIP_VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518,
                    mlp_ratio=4, layerscale_value=1.0)
GOALS = {"inst_fast": 0.4, "inst_ddim50": 1.2, "token_1000_steps": 240.0, "stain_ddim50": 2.0, "count_4096": 0.5}


def build_inst(dtype, device, tiny: bool = False):
    """An InSTPipeline: SD v1.4 + CLIP ViT-L/14 at full size (random weights), or the tiny test pipeline."""
    import torch

    from cellsynth.stylize.tiny import tiny_components, tiny_pipeline

    if tiny:
        return tiny_pipeline(0).to(device)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from cellsynth.stylize.pipeline_inst import InSTPipeline, inst_scheduler
    from cellsynth.weights import sd_v1_config_dir

    cfg = sd_v1_config_dir()
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
        image = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14))
    if str(device) == "meta":
        return {"unet": unet, "vae": vae, "text_encoder": text, "image_encoder": image}
    tokenizer = tiny_components(0)["tokenizer"]  # ids only matter for timing; the real one is not shipped
    pipe = InSTPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=inst_scheduler(),
                        safety_checker=None, feature_extractor=CLIPImageProcessor(), image_encoder=image,
                        requires_safety_checker=False)
    return pipe.to(device, dtype)


def build_stain(device, tiny: bool = False):
    """A StainPipeline with the public code's UNet (base 64, x[1,2,4,8], 2 blocks), random weights."""
    import torch

    from cellsynth.stain.model import StainModelConfig, build_unet
    from cellsynth.stain.pipeline_stain import StainPipeline

    kw = dict(block_out_channels=[64, 128, 256, 512], layers_per_block=2, norm_num_groups=32, sample_size=512,
              num_train_timesteps=2000)
    if tiny:
        kw = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8, sample_size=32,
                  num_train_timesteps=20, attention_head_dim=4)
    cfg = StainModelConfig(**kw)
    with torch.device(device):
        unet = build_unet(cfg)
    if str(device) == "meta":
        return unet
    return StainPipeline(unet.eval(), cfg)


def build_dinov2(device, tiny: bool = False):
    import torch
    from transformers import Dinov2Config, Dinov2Model

    kw = DINOV2_SMALL if not tiny else dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            patch_size=14, image_size=56, mlp_ratio=2)
    with torch.device(device):
        return Dinov2Model(Dinov2Config(**kw)).eval()


def build_dino_vits8(device):
    import timm
    import torch

    with torch.device(device):
        return timm.create_model("vit_small_patch8_224", pretrained=False, dynamic_img_size=True)


def param_counts() -> dict:
    """Parameters of every full-size stand-in, built on the meta device."""
    n = lambda m: int(sum(p.numel() for p in m.parameters()))  # noqa: E731
    inst = build_inst(None, "meta")
    out = {f"sd_v1_4_{k}": n(v) for k, v in inst.items()}
    out["stain_unet"] = n(build_stain("meta"))
    out["dinov2_small"] = n(build_dinov2("meta"))
    out["dino_vits8"] = n(build_dino_vits8("meta"))
    return out


class Timer:
    """Wall seconds (synchronised) and peak device memory of a block."""

    def __init__(self, device) -> None:
        import torch

        self.torch, self.cuda = torch, str(device).startswith("cuda")

    def __call__(self, fn, repeat: int = 1) -> dict:
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(repeat):
            result = fn()
        if self.cuda:
            torch.cuda.synchronize()
        out = {"seconds": round((time.perf_counter() - t0) / repeat, 3)}
        if self.cuda:
            out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["_result"] = result
        return out


def run_checks(device: str, *, tiny: bool = False, compile: bool = False, token_steps: int = 100) -> dict:
    import torch

    from cellsynth.count import count_cells
    from cellsynth.stain import NSCParams, StainParams
    from cellsynth.stain.features import Dinov2Backbone
    from cellsynth.stain.nsc import nsc_masks
    from cellsynth.stylize import StylizeParams, TrainParams, train_token
    from cellsynth.stylize.loading import optimize_pipeline
    from cellsynth.stylize.tiny import tiny_token
    from cellsynth.stylize.train import default_mapper
    from cellsynth.stylize.tokens import StyleToken

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    size = 32 if tiny else 512
    timer, table = Timer(device), {}
    rng = np.random.default_rng(0)
    content = (rng.random((size, size)) * 255).astype(np.uint8)
    style = (rng.random((size, size)) * 255).astype(np.uint8)

    def record(name, fn, warmup=True, **extra):
        if warmup:
            fn()
        res = timer(fn)
        res.pop("_result")
        table[name] = {**res, **extra}
        print(name, json.dumps(table[name]), file=sys.stderr, flush=True)

    # InST: DDIM-50 and DPM-Solver++ 20 at 512x512
    pipe = build_inst(dtype, device, tiny)
    table["inst_speed_settings"] = optimize_pipeline(pipe, channels_last=device.startswith("cuda"), compile=compile)
    token = tiny_token(0) if tiny else StyleToken(default_mapper(768))
    for name, sched, steps in (("inst_ddim50", "ddim", 50), ("inst_fast", "dpmsolver++", 20)):
        params = StylizeParams(num_inference_steps=steps, scheduler=sched, size=size)
        record(name, lambda: pipe(content, style, token, params=params), steps=steps, scheduler=sched)

    # token training: 100 steps (float32 mapper, half frozen models, GradScaler with fp16)
    train = TrainParams(steps=token_steps, size=size, checkpoint_every=0)
    res = timer(lambda: train_token([style], pipe, token=StyleToken(default_mapper(token.dim)), params=train))
    result = res.pop("_result")
    table[f"token_{token_steps}_steps"] = {**res, "precision": result.precision,
                                            "finite": bool(np.isfinite(result.losses).all())}
    table["token_1000_steps"] = {"seconds_estimated": round(result.seconds_per_step * 1000, 1)}
    del pipe

    # DiffStain 512x512, 5 channels, DDIM-50
    stain = build_stain(device, tiny)
    stain.unet.to(device)
    bf = rng.random((3, size, size)).astype(np.float32)
    params = StainParams(steps=50, tile=0, batch_size=1)
    record("stain_ddim50", lambda: stain(bf, params=params), channels=5)
    del stain

    # NSC on DINOv2-small features, 512x512
    backbone = Dinov2Backbone(build_dinov2(device, tiny), device=device)
    nsc = NSCParams(backbone="dinov2-small", patch=14, input_size=56 if tiny else 224, fov=56 if tiny else 112)
    img = rng.random((size, size)).astype(np.float32)
    record("nsc_dinov2", lambda: nsc_masks(img, params=nsc, backbone=backbone), warmup=False)

    # the shipped default counter on a 4096x4096 image
    side = 256 if tiny else 4096
    big = (rng.random((side, side)) * 50).astype(np.uint8)
    record("count_4096", lambda: count_cells(big, model="default", diameter=12.0, device=device), size=side)

    for name, goal in GOALS.items():
        got = table.get(name, {})
        seconds = got.get("seconds", got.get("seconds_estimated"))
        if seconds is not None:
            got["goal_s"], got["meets_goal"] = goal, bool(seconds <= goal)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile", action="store_true", help="torch.compile the InST UNet")
    ap.add_argument("--build-only", action="store_true", help="build the full-size models on the meta device")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks this script)")
    ap.add_argument("--token-steps", type=int, default=100)
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args(argv)

    import torch

    if args.build_only:
        out = {"parameters": param_counts()}
    elif args.tiny:
        out = {"device": "cpu (tiny models)", "table": run_checks("cpu", tiny=True, token_steps=args.token_steps)}
    elif not torch.cuda.is_available():
        print(json.dumps({"gpu": False, "error": "no CUDA GPU is available (torch.cuda.is_available() is False); "
                          "run this on a machine with an NVIDIA GPU, or use --build-only / --tiny here"}))
        return 2
    else:
        from cellsynth.device import describe_device

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        out = {"device": describe_device("cuda"), "torch": torch.__version__,
               "table": run_checks("cuda", compile=args.compile, token_steps=args.token_steps)}
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
