"""Train the image tokenizer: `accelerate launch -m train.vae --config configs/shapes.toml`.

`vae.kind = "dvae"` trains DALL-E's discrete VAE (Gumbel-softmax temperature annealed from
`temperature_start` to `temperature_end`, KL-to-uniform weight raised from 0 to `kl_weight`, both on
step schedules that a resumed run continues); `"vq"` trains the VQGAN-style quantiser, with its
patch discriminator switched on at `vae.disc_start` when that is >= 0 (its own AdamW, checkpointed
with the run).

Writes RUN/vae.safetensors + RUN/vae.json (loadable by `vae.load_pretrained` alone), checkpoints under
RUN/checkpoints/vae/ and TensorBoard logs under RUN/logs/vae/: losses, temperature, KL weight, PSNR,
codebook usage (the fraction of the codes used over the last `vae.usage_window` batches) and perplexity, validation
PSNR/SSIM/usage, and a grid of originals over reconstructions.

`--init-from BUNDLE_OR_RUN` starts from that model's image tokenizer (the same kind and sizes) instead of
random weights, and `train.vae.freeze` leaves parameter groups untrained: encoder, codebook, decoder,
discriminator (train.finetune). A critic the source has not starts from random weights, so a VQ trained without
one can have its decoder fine-tuned with one, every image's codes unchanged:
`--set vae.disc_start=0 --set 'train.vae.freeze=["encoder", "codebook"]'`.

`train.vae_decoder.steps > 0` adds a second phase to a VQ's run: after `train.vae.steps`, the decoder alone trains
on, its encoder and codebook frozen, so every image's codes stay those of the first phase (as Stable Diffusion's VAE
decoder was fine-tuned with MSE). A decoder trained on a moving quantiser learns to draw from codes that are still
changing; once they stop, a few more steps on the fixed codes draw them closer to the images. Its own settings
(`[train.vae_decoder]`: lr, steps, a `freeze` of its own beside the encoder and codebook, checkpoints under
RUN/checkpoints/vae_decoder/, logs under RUN/logs/vae_decoder/) share the first phase's accelerator (so its
mixed_precision), and its schedules (the critic's start) continue from the first phase's last step.
RUN/vae.safetensors is written once, at the end of the last phase, so `train.all` reruns a stage killed between
phases, which resumes where it stopped. From a trained bundle, the decoder alone: `--init-from BUNDLE --set
train.vae.steps=0 --set train.vae_decoder.steps=1000`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

import vae
from dalle_mini_impl.data.images import make_grid
from dalle_mini_impl.errors import UserError, run_cli
from dalle_mini_impl.eval.recon import recon_summary, recon_sums
from train import finetune, loop
from train.common import adamw, example_batches, seed_everything, trainable
from vae.vq import CRITIC_PREFIX


def build_tokenizer(cfg) -> vae.ImageTokenizer:
    """The image tokenizer of a run config; a bad combination of fields is a one-sentence error."""
    try:  # first: it checks the factor itself, which the division below needs
        model = vae.build(cfg.vae.kind, **vae.model_kwargs(cfg.vae.kind, dataclasses.asdict(cfg.vae)))
    except vae.VAEError as e:
        raise UserError(f"config section 'vae': {e}") from None
    if cfg.data.image_size % cfg.vae.factor:
        raise UserError(
            f"data.image_size {cfg.data.image_size} is not divisible by vae.factor {cfg.vae.factor}; "
            "pick sizes whose ratio is the grid side"
        )
    return model


def adversarial(cfg) -> bool:
    """Whether the tokenizer trains with the VQ's patch critic (`vae.disc_start >= 0`)."""
    return cfg.vae.kind == "vq" and cfg.vae.disc_start >= 0


MIN_TEMPERATURE = 1e-3  # the dVAE's lowest Gumbel-softmax temperature; DALL-E's anneals to 1/16
# the training settings of the image tokenizer that building it does not read: (key, lowest, above it strictly?, e.g.)
SCHEDULE_BOUNDS = (
    # the Gumbel-softmax divides by the temperature: near 0 it overflows (1e-38 stopped a step with a traceback)
    ("temperature_start", MIN_TEMPERATURE, False, "1.0"),
    ("temperature_end", MIN_TEMPERATURE, False, "0.0625"),
    ("temperature_steps", 0, False, "5000"),
    ("kl_weight", 0, False, "1e-4"),
    ("kl_warmup_steps", 0, False, "2000"),
    ("diversity_weight", 0, False, "0.01"),
    ("commitment_weight", 0, False, "0.25"),
    ("disc_weight", 0, False, "0.1"),
    ("usage_window", 1, False, "100"),
)


def check_schedules(v) -> None:
    """One sentence for a `vae.*` schedule or loss weight no run can use (a temperature of 0 stopped the first
    step with a ValueError; a negative weight trained away from the data, in silence)."""
    for key, lowest, strictly, example in SCHEDULE_BOUNDS:
        value = getattr(v, key)
        if not math.isfinite(value) or value < lowest or (strictly and value == lowest):
            bound = f"above {lowest:g}" if strictly else f"at least {lowest:g}"
            raise UserError(f"config key 'vae.{key}' is {value}; set it {bound}, e.g. {example}")


def check_phases(cfg) -> None:
    """One sentence for a setting of either phase (`train.vae`, `train.vae_decoder`) this run cannot use, before
    anything trains: the second phase's would otherwise surface only after the first had trained."""
    build_tokenizer(cfg)  # its settings (vae.factor, ...), checked by building it once
    check_schedules(cfg.vae)
    for name in ("vae", "vae_decoder"):
        if getattr(cfg.train, name).grad_checkpointing:
            raise UserError(
                f"train.{name}.grad_checkpointing is true, and the image tokenizer has none; set it to false"
            )
    if adversarial(cfg) and cfg.train.vae.mixed_precision == "fp16":
        raise UserError(
            f"vae.disc_start is {cfg.vae.disc_start} and train.vae.mixed_precision 'fp16': the critic and the adaptive "
            "weight of its loss step outside the loop's loss scaling, where fp16 gradients underflow; use 'bf16'"
        )
    tc, first = cfg.train.vae_decoder, cfg.train.vae
    loop.check_training_values(tc, "train.vae_decoder.")
    if tc.steps == 0:
        return
    if cfg.vae.kind != "vq":
        raise UserError(
            f"train.vae_decoder.steps is {tc.steps}, which fine-tunes a VQ's decoder on its fixed codes, and vae.kind "
            f"is '{cfg.vae.kind}'; set train.vae_decoder.steps=0 or vae.kind=vq"
        )
    if tc.mixed_precision != first.mixed_precision:
        raise UserError(
            f"train.vae_decoder.mixed_precision is '{tc.mixed_precision}' and train.vae.mixed_precision "
            f"'{first.mixed_precision}'; the two phases share one accelerator, so give them the same"
        )


def main(argv: list[str] | None = None) -> int:
    cfg, args = loop.parse_args(argv, __doc__)
    check_phases(cfg)
    # the critic's parameters sit idle before disc_start: DDP must be told they may go unused
    accelerator = loop.make_accelerator(cfg.train.vae, find_unused_parameters=adversarial(cfg), key="train.vae.")
    seed_everything(cfg.seed)
    if cfg.vae.kind == "dvae":
        # a Gumbel-softmax at low temperature leaves some of its probabilities subnormal, which x86 CPUs
        # compute slowly: they are flushed to zero
        torch.set_flush_denormal(True)
    model = build_tokenizer(cfg)
    source = finetune.init_source(cfg, args, "vae", "vae_decoder")
    if source is not None:
        # a critic the source lacks starts fresh: a tokenizer trained without one can be fine-tuned with one (its
        # decoder alone, with the encoder and codebook frozen, keeps every image's codes)
        critic = tuple(name for name in model.state_dict() if name.startswith(CRITIC_PREFIX))
        finetune.start_from(model, source, "vae", "image tokenizer", cfg, "vae", keep_own=critic)
    phases = [("vae", cfg.train.vae, cfg.train.vae.freeze, 0)]
    if cfg.train.vae_decoder.steps > 0:
        frozen = ["encoder", "codebook"] + [g for g in cfg.train.vae_decoder.freeze if g not in ("encoder", "codebook")]
        phases.append(("vae_decoder", cfg.train.vae_decoder, frozen, cfg.train.vae.steps))
    names = [name for name, *_ in phases]
    for i, (name, tc, frozen, offset) in enumerate(phases):
        for p in model.parameters():  # each phase freezes what its own settings name, not what the last froze
            p.requires_grad_(True)
        finetune.freeze(model, "vae", frozen, name)
        if i > 0 and accelerator.is_main_process:  # a phase a preset may set where the command line does not show it
            print(
                f"{name}: {tc.steps} more steps of the decoder alone on the fixed codes follow "
                f"(train.{name}.steps; 0: none)",
                file=sys.stderr,
                flush=True,
            )
        stage = phase(cfg, name, tc, model, accelerator, offset, export=i == len(phases) - 1)
        loop.report(name, loop.run(cfg, tc, stage, accelerator, phase_args(args, names, i)), accelerator)
    return 0


def phase_args(args: argparse.Namespace, names: list[str], i: int) -> argparse.Namespace:
    """The command's arguments as phase `i` reads them. `--resume CHECKPOINT` names one phase's checkpoint (any
    folder outside checkpoints/vae_decoder/: the first phase's): the phases before it resume their latest, and
    those after it start over, since the checkpoint's phase is trained again from there."""
    if getattr(args, "no_resume", False) or args.resume in (None, "", "latest"):
        return args
    folder = Path(args.resume).resolve().parent.name
    owner = names.index(folder) if folder in names else 0
    if i == owner:
        return args
    return argparse.Namespace(**{**vars(args), "resume": "latest", "no_resume": i > owner})


def phase(cfg, name: str, tc, model, accelerator, offset: int, export: bool) -> loop.Stage:
    """One phase of the tokenizer's training as a loop stage: `name` names its checkpoints and logs, `offset` is
    the step its schedules start at (a later phase continues the earlier's), and only the last phase `export`s
    RUN/vae.safetensors."""
    params = model.generator_parameters() if adversarial(cfg) else list(model.parameters())
    optimizer = adamw(params, tc, accelerator)
    batches = example_batches(cfg, cfg.data.split, tc.batch_size, train=True, accelerator=accelerator)
    usage = vae.CodeUsage(cfg.vae.codebook_size, window=cfg.vae.usage_window)
    schedule = {k: getattr(cfg.vae, k) for k in vae.SCHEDULE_FIELDS}
    last: dict[str, torch.Tensor] = {}

    def loss(m, batch, step, micro):  # the VAE's draws come from the global generator, which moves on by itself
        value, metrics = m(batch["image"], offset + step, **vae.schedules.values_at(offset + step, **schedule))
        used, perplexity = usage.update(metrics.pop("ids"))
        last["reconstruction"] = metrics.pop("reconstruction")
        scalars = {k: float(v) for k, v in metrics.items()}
        scalars.update(usage=used, perplexity=perplexity)
        return value, scalars

    extra_state = {"code_usage": usage}  # the logged usage and perplexity continue across a resume
    after_step = None
    # a frozen critic (train.vae.freeze = ["discriminator"]) still judges the reconstructions but is not trained
    if adversarial(cfg) and trainable(model.discriminator.parameters()):
        critic_opt = torch.optim.AdamW(trainable(model.discriminator.parameters()), lr=tc.lr, betas=(0.5, 0.9))
        extra_state["discriminator_optimizer"] = critic_opt

        def after_step(m, batch, step, acc):
            if not m.adversarial_active(offset + step):
                return {}
            critic_opt.zero_grad(set_to_none=True)
            with acc.autocast():
                value, metrics = m.discriminator_loss(batch["image"], last["reconstruction"])
            value.backward()
            if acc.num_processes > 1:  # the critic runs outside DDP: average its gradients by hand
                for p in m.discriminator.parameters():
                    if p.grad is not None:
                        p.grad = acc.reduce(p.grad, "mean")
            critic_opt.step()
            # the generator's next loss writes the critic's gradients afresh, as after a resume, which starts without
            critic_opt.zero_grad(set_to_none=True)
            return {k: float(v) for k, v in metrics.items()}

    validation_batches = loop.Replay(
        example_batches(cfg, cfg.data.val_split, tc.batch_size, train=False, accelerator=accelerator),
        tc.eval_batches,
    )

    def evaluate(m, step):
        m.eval()
        sums, counts = recon_sums(m, validation_batches(), accelerator.device)
        if accelerator.num_processes > 1:  # each process evaluated its own share of the split: the numbers are all's
            sums, counts = (accelerator.reduce(t.to(accelerator.device), "sum").cpu() for t in (sums, counts))
        metrics = recon_summary(sums, counts)
        kept = {f"val_{k}": float(v) for k, v in metrics.items() if k in ("psnr", "ssim", "usage", "perplexity")}
        return kept | {"data_skipped": float(validation_batches.skipped)}  # warned of once, counted every time

    def log_images(m, step):
        batch = next(validation_batches())
        x = batch["image"][:8].to(accelerator.device)
        with torch.no_grad():
            y = m.decode(m.encode(x))
        return {f"{name}/originals_over_reconstructions": make_grid(torch.cat([x, y]).cpu(), nrow=len(x))}

    return loop.Stage(
        name=name,
        model=model,
        optimizer=optimizer,
        batches=batches,
        loss=loss,
        evaluate=evaluate,
        log_images=log_images,
        export=(lambda m, state: vae.save_pretrained(m, cfg.out_dir, state=state)) if export else None,
        after_step=after_step,
        extra_state=extra_state,
        # the critic's step runs on the unwrapped model, outside the wrapper that would gather its shards
        needs_whole_weights="vae.disc_start's critic" if adversarial(cfg) else "",
        clip_parameters=model.generator_parameters if adversarial(cfg) else None,
    )


if __name__ == "__main__":
    run_cli(main)
