"""Benchmark InST stylization and style-token training, ratios measured in one run.

1. Per-denoising-step time of :class:`cellsynth.stylize.InSTPipeline` against
   diffusers' stock ``StableDiffusionImg2ImgPipeline`` on identical components
   (goal <= 1.05x): the median interval between step callbacks, so fixed costs
   (encoding, the one inversion pass, decoding) are reported apart.
2. Time per training step with cached VAE latents and CLIP embeddings against
   re-encoding every step (goal <= 0.6x).

    python benchmarks/bench_stylize.py                # tiny components, CPU
    python benchmarks/bench_stylize.py --scale sd --device cuda --size 512

``--scale sd`` builds Stable Diffusion v1-sized components with random weights
(same architecture and cost as the real ones, no download).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def sd_sized_components(seed: int = 0) -> dict:
    """SD v1 / CLIP ViT-L/14 architectures with random weights and the tiny tokenizer."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from cellsynth.stylize.pipeline_inst import inst_scheduler
    from cellsynth.weights import resources_dir

    tok = CLIPTokenizer.from_pretrained(resources_dir() / "tokenizer-tiny")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                                            num_hidden_layers=24, num_attention_heads=16,
                                                            patch_size=14, projection_dim=768))
    return {"vae": vae.eval(), "text_encoder": text.eval(), "tokenizer": tok, "unet": unet.eval(),
            "scheduler": inst_scheduler(), "safety_checker": None, "image_encoder": vision.eval(),
            "feature_extractor": CLIPImageProcessor()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("tiny", "sd"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of a full run")
    parser.add_argument("--strength", type=float, default=0.7)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--skip-train", action="store_true", help="only the inference comparison")
    args = parser.parse_args(argv)

    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from cellsynth.stylize import InSTPipeline, TrainParams, train_token
    from cellsynth.stylize.tiny import tiny_components, tiny_token
    from cellsynth.stylize.train import default_mapper
    from cellsynth.stylize.tokens import StyleToken

    torch.set_num_threads(args.threads)
    parts = tiny_components(0) if args.scale == "tiny" else sd_sized_components(0)
    inst = InSTPipeline(**parts, requires_safety_checker=False).to(args.device)
    stock = StableDiffusionImg2ImgPipeline(**parts, requires_safety_checker=False).to(args.device)
    for p in (inst, stock):
        p.set_progress_bar_config(disable=True)
    width = parts["text_encoder"].config.hidden_size
    token = tiny_token(0) if args.scale == "tiny" else StyleToken(default_mapper(width).eval())
    rng = np.random.default_rng(0)
    content = (rng.random((args.size, args.size)) * 255).astype(np.uint8)
    style = (rng.random((args.size, args.size)) * 255).astype(np.uint8)
    rgb = np.repeat(content[..., None], 3, -1).astype(np.float32) / 255.0

    def run_inst(n, stamps):
        def progress(p):
            if p.message.startswith("denoising step"):
                stamps.append(time.perf_counter())

        inst(content, style, token, strength=args.strength, num_inference_steps=n, size=args.size, progress=progress)

    def run_stock(n, stamps):
        def on_step(pipe, i, t, kwargs):
            stamps.append(time.perf_counter())
            return kwargs

        stock(prompt="*", image=rgb, strength=args.strength, num_inference_steps=n, guidance_scale=10.0,
              output_type="np", generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=on_step)

    runs = {"inst": run_inst, "stock": run_stock}
    for fn in runs.values():
        fn(2, [])  # warm-up
    n = args.steps
    step_times = {name: [] for name in runs}
    whole = {name: float("inf") for name in runs}
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits both alike
        for name, fn in runs.items():
            stamps = []
            t0 = time.perf_counter()
            fn(n, stamps)
            whole[name] = min(whole[name], time.perf_counter() - t0)
            step_times[name].append(float(np.median(np.diff(stamps))))
    per_step = {k: min(v) for k, v in step_times.items()}  # the least disturbed run
    print(f"device {args.device}, scale {args.scale}, image {args.size}x{args.size}, strength {args.strength}, "
          f"{int(n * args.strength)} of {n} DDIM steps, torch threads {args.threads}, {args.repeats} repeats")
    print(f"per denoising step (median of a run, best run): InST {per_step['inst'] * 1e3:.2f} ms, stock img2img "
          f"{per_step['stock'] * 1e3:.2f} ms, ratio {per_step['inst'] / per_step['stock']:.3f} (goal <= 1.05)")
    print(f"whole run (best): InST {whole['inst']:.3f} s, stock {whole['stock']:.3f} s (InST adds the style "
          "latent, the CLIP image embedding and one inversion pass)")
    if args.skip_train:
        return 0
    styles = [style, style[::-1]]
    per_step = {}
    for cache in (True, False):
        params = TrainParams(steps=args.train_steps, size=args.size // 8 * 8, cache=cache, checkpoint_every=0)
        mk = (lambda: tiny_token(0)) if args.scale == "tiny" else (lambda: StyleToken(default_mapper(width)))
        train_token(styles, inst, token=mk(), params=TrainParams(steps=2, size=params.size, cache=cache,
                                                                 checkpoint_every=0))  # warm-up
        per_step[cache] = min(train_token(styles, inst, token=mk(), params=params).seconds_per_step
                              for _ in range(args.repeats))
    print(f"training step: cached latents {per_step[True] * 1e3:.2f} ms, re-encoding {per_step[False] * 1e3:.2f} ms, "
          f"ratio {per_step[True] / per_step[False]:.3f} (goal <= 0.6)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
