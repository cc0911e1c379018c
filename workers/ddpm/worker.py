"""DDPM (Ho et al. 2020): a U-Net predicting ε (or v, or x_0), trained with Algorithm 1, sampled
with the ancestral sampler (Algorithm 2) or DDIM, from the EMA weights.

Distillation is progressive (Salimans & Ho 2022; `workers/diffusion/progressive.py`): the
student starts as the teacher's EMA weights and, round by round, learns to match two DDIM steps
of the round's teacher with one; at the end of a round it becomes the next round's teacher. A
distilled checkpoint records `prediction` and `distilled_steps` in its model section, and
samples with that many DDIM steps on the "trailing" grid it was distilled on.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from orchestrator.checkpoints import Checkpoint
from workers.ddpm import SAMPLERS
from workers.diffusion.losses import ddpm_loss
from workers.diffusion.parameterization import eps_model
from workers.diffusion.progressive import progressive_loss, round_of
from workers.diffusion.samplers import first_timestep, make_sampler, sample
from workers.diffusion.schedules import make_schedule
from workers.nn.conditioning import conditioned, guided
from workers.nn.unet import UNet
from workers.rounds import RoundsWorker

# DDIM's steps when a job does not set `sample.steps` (Song et al.'s and diffusers' default),
# also those of the grids logged during training; a model with fewer timesteps takes them all
DDIM_DEFAULT_STEPS = 50


class DDPMWorker(RoundsWorker):
    family = "ddpm"
    clip_x0 = True  # pixels live in [-1, 1]; latents (ldm) do not

    def build(self, model_cfg: dict[str, Any], image_shape: tuple[int, int, int]) -> None:
        self.build_diffusion(model_cfg, image_shape)

    def build_diffusion(self, model_cfg: dict[str, Any], shape: tuple[int, int, int]) -> None:
        """The U-Net, schedule and EMA for diffusion over tensors of `shape` (C, H, W): pixels
        here, latents in latent diffusion."""
        self.sample_shape = shape
        channels, size, _ = shape
        net = UNet(
            in_channels=channels, image_size=size, channels=model_cfg["channels"],
            channel_mult=tuple(model_cfg["channel_mult"]),
            num_res_blocks=model_cfg["num_res_blocks"],
            attn_resolutions=tuple(model_cfg["attn_resolutions"]),
            dropout=model_cfg["dropout"], num_classes=self.conditioning(model_cfg),
        ).to(self.device)
        self.modules = {"net": net}
        self.schedule = make_schedule(
            model_cfg["schedule"], model_cfg["timesteps"], model_cfg["beta_start"],
            model_cfg["beta_end"],
        ).to(self.device)
        self.emas = self.averaged(net=net)
        self.set_sampling(model_cfg.get("prediction", "eps"), model_cfg.get("distilled_steps"))

    def set_sampling(self, prediction: str, distilled_steps: int | None) -> None:
        """What the network predicts, and how it samples when a job does not say: a distilled
        model with its own steps on the trailing grid, else DDIM_DEFAULT_STEPS DDIM steps (the
        ancestral sampler: every timestep) on the linspace grid."""
        self.prediction = prediction
        self.distilled_steps = distilled_steps
        self.spacing = "trailing" if distilled_steps else "linspace"

    def on_resume(self, ckpt: Checkpoint) -> None:
        # A distillation's model section names the student's parameterisation and steps
        # (`_enter_round`); a resume that trains no further step enters no round.
        self.set_sampling(self.model_cfg.get("prediction", "eps"),
                          self.model_cfg.get("distilled_steps"))
        self.baked_guidance = self.model_cfg.get("distilled_guidance")

    def configure_optimizers(self, train_cfg: dict[str, Any]) -> None:
        self.optimizers = {"net": torch.optim.Adam(self.modules["net"].parameters(), lr=train_cfg["lr"])}

    def prepare_data(self, x: torch.Tensor, labels: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return x, self.checked_labels(labels)

    def train_step(self, batch: torch.Tensor, labels: torch.Tensor | None,
                   gen: torch.Generator) -> dict[str, torch.Tensor]:
        loss = ddpm_loss(self.conditioned_net(labels, gen), self.schedule, batch, generator=gen,
                         prediction=self.prediction)
        self.optimize(loss, "net")
        return {"loss": loss.detach()}

    def default_steps(self, sampler: str) -> int:
        """The steps of `sampler` when a job leaves `sample.steps` out: a distilled model's
        own; ancestral: every timestep from where sampling starts (`first_timestep`); DDIM:
        its default, or that, if fewer."""
        if self.distilled_steps:
            return self.distilled_steps
        every = first_timestep(self.schedule, self.clip_x0) + 1
        return every if sampler == "ancestral" else min(DDIM_DEFAULT_STEPS, every)

    def sampler_settings(self, sample_cfg: dict[str, Any] | None) -> dict[str, Any]:
        """Sampler, steps, η and spacing of a sample job's settings, resolved as `generate`
        applies them (None: the previews')."""
        if sample_cfg is None:
            return {"sampler": SAMPLERS[0], "steps": self.default_steps(SAMPLERS[0]), "eta": 0.0,
                    "spacing": self.spacing}
        sampler = sample_cfg.get("sampler") or SAMPLERS[0]
        return {"sampler": sampler, "eta": sample_cfg["eta"],
                "steps": sample_cfg.get("steps") or self.default_steps(sampler),
                "spacing": sample_cfg.get("spacing") or self.spacing,
                "use_ema": sample_cfg.get("use_ema", True), **self.guidance_settings(sample_cfg)}

    def generate(self, n: int, sample_cfg: dict[str, Any] | None, gen: torch.Generator,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        s = self.sampler_settings(sample_cfg)
        return self.decode(self.diffuse(self.sampling_module("net"), self.prediction, n,
                                        s["sampler"], s["steps"], s["eta"], s["spacing"], gen,
                                        progress, self.sample_labels(n, sample_cfg),
                                        s.get("guidance", 1.0)))

    def diffuse(self, net: nn.Module, prediction: str, n: int, sampler: str, steps: int,
                eta: float, spacing: str, gen: torch.Generator,
                progress: Callable[[int, int], None] | None = None,
                labels: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
        """Run a reverse process with `net` from pure noise (for a class-conditional `net`:
        of classes `labels`, with classifier-free guidance at scale `guidance`)."""
        kwargs = {"eta": eta} if sampler == "ddim" else {}
        chain = make_sampler(sampler, self.schedule, clip_x0=self.clip_x0, **kwargs)
        was_training = net.training
        net.eval()
        try:
            predict = guided(net, labels, guidance, self.num_classes)
            return sample(eps_model(predict, self.schedule, prediction), chain,
                          (n, *self.sample_shape), num_steps=steps, spacing=spacing,
                          generator=gen, device=self.device, progress=progress)
        finally:
            net.train(was_training)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images from what the diffusion runs over (pixels here)."""
        return x

    # ---- progressive distillation -------------------------------------------------------
    def begin_distillation(self, teacher: Checkpoint) -> None:
        cfg = self.job["distill"]
        teacher_model = teacher.meta["model"]
        self.teacher_prediction = teacher_model.get("prediction", "eps")
        self.begin_rounds(teacher_model, cfg["teacher_steps"] or teacher_model.get("distilled_steps")
                          or teacher_model["timesteps"])

    def _round_steps(self, r: int) -> tuple[int, int]:
        """(teacher steps, student steps) of round `r`."""
        return self.start_steps // 2**r, self.start_steps // 2 ** (r + 1)

    def _enter_round(self, r: int) -> None:
        self._round = r
        student_steps = self._round_steps(r)[1]
        prediction = self.job["distill"]["prediction"]
        self.model_cfg = {**self.model_cfg, "prediction": prediction,
                          "distilled_steps": student_steps}
        self.model_cfg.update(self.student_guidance)
        self.baked_guidance = self.model_cfg.get("distilled_guidance")
        self.set_sampling(prediction, student_steps)
        self._round_loss = [torch.zeros((), device=self.device), 0]  # summed on the device

    def learning_rate(self, step: int, cfg: dict[str, Any]) -> float:
        if self.task.kind != "distill":
            return super().learning_rate(step, cfg)
        # each round: warm-up, then linear decay to zero (Salimans & Ho)
        local = step - round_of(step, self.steps_per_round) * self.steps_per_round
        return super().learning_rate(local, cfg) * (1 - (local - 1) / self.steps_per_round)

    def distill_step(self, batch: torch.Tensor, labels: torch.Tensor | None,
                     gen: torch.Generator) -> dict[str, torch.Tensor]:
        r = round_of(self.step, self.steps_per_round)
        if r != self._round:
            self._enter_round(r)
        teacher_steps, student_steps = self._round_steps(r)
        # the first round's teacher is guided as the job asks; the later rounds' teachers
        # (students of the earlier rounds) have that guidance built in
        teacher = guided(self.frozen["round_teacher"], labels, self.round_guidance(r),
                         self.num_classes)
        loss = progressive_loss(
            conditioned(self.modules["net"], labels), self.prediction, teacher,
            self.teacher_prediction if r == 0 else self.prediction, self.schedule, batch,
            teacher_steps, clip=self.clip_x0, generator=gen)
        self.optimize(loss, "net")
        self._round_loss[0] += loss.detach()  # no host sync in the step; read at round end
        self._round_loss[1] += 1
        return {"loss": loss.detach(), "round": torch.tensor(r + 1.0),
                "student_steps": torch.tensor(float(student_steps))}

    def end_step(self, step: int) -> None:
        if self.task.kind != "distill" or step % self.steps_per_round:
            return
        total, count = self._round_loss
        self.log.log_metrics({"round_loss": float(total) / max(count, 1),
                              "round_student_steps": self._round_steps(self._round)[1]},
                             self._round + 1)
        if step < self.total_steps:
            self.next_round(step)

    def teacher_generate(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.decode(self.diffuse(self.teacher["net"], self.teacher_prediction, n, "ddim",
                                        self.start_steps, 0.0, "trailing", gen,
                                        labels=self.sample_labels(n, None),
                                        guidance=self.teacher_guidance))

    def distill_metrics(self) -> dict[str, float]:
        return {"teacher_sampling_steps": self.start_steps,
                "student_sampling_steps": self.distilled_steps}
