"""GAN (Goodfellow et al. 2014) with DCGAN networks: `d_steps` discriminator updates per
generator update, the non-saturating generator loss with BCEWithLogits (or the hinge loss),
Adam(betas 0.5/0.999). Samples come from an EMA of the generator."""

from __future__ import annotations

from typing import Any, Callable

import torch

from orchestrator.checkpoints import Checkpoint
from workers.base import Worker
from workers.nn.adversarial import discriminator_loss, generator_loss
from workers.gan.nets import Discriminator, Generator
from workers.nn.distillation import regression_loss


class GANWorker(Worker):
    family = "gan"

    def build(self, model_cfg: dict[str, Any], image_shape: tuple[int, int, int]) -> None:
        channels, size, _ = image_shape
        self.cfg = model_cfg
        g = Generator(z_dim=model_cfg["z_dim"], channels=channels, image_size=size,
                      width=model_cfg["g_width"]).to(self.device)
        d = Discriminator(channels=channels, image_size=size,
                          width=model_cfg["d_width"]).to(self.device)
        self.modules = {"g": g, "d": d}
        self.emas = self.averaged(g=g)

    def configure_optimizers(self, train_cfg: dict[str, Any]) -> None:
        betas = tuple(self.cfg["betas"])
        self.optimizers = {name: torch.optim.Adam(m.parameters(), lr=train_cfg["lr"], betas=betas)
                           for name, m in self.modules.items()}

    def _z(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.cfg["z_dim"], generator=gen, device=self.device)

    def train_step(self, batch: torch.Tensor, labels: torch.Tensor | None,
                   gen: torch.Generator) -> dict[str, torch.Tensor]:
        g, d, kind = self.modules["g"], self.modules["d"], self.cfg["loss"]
        k = self.cfg["d_steps"]
        for i in range(k):  # k discriminator steps (Algorithm 1)
            if i < k - 1:
                with torch.no_grad():
                    fake = g(self._z(len(batch), gen))
            else:  # the last one's fakes are the generator's too, as in DCGAN: one G forward
                fake = g(self._z(len(batch), gen))
            real_logits, fake_logits = d(batch), d(fake.detach())
            loss_d = discriminator_loss(real_logits, fake_logits, kind)
            self.optimize(loss_d, "d")
        fake_logits_g = d(fake)
        loss_g = generator_loss(fake_logits_g, kind)
        self.optimize(loss_g, "g")
        return {
            "loss_d": loss_d.detach(), "loss_g": loss_g.detach(),
            "d_real": torch.sigmoid(real_logits).mean().detach(),
            "d_fake": torch.sigmoid(fake_logits).mean().detach(),
        }

    def begin_distillation(self, teacher: Checkpoint) -> None:
        super().begin_distillation(teacher)
        # The student is a generator only; the teacher's discriminator stays as a frozen critic.
        self.critic = self.teacher.pop("d")
        del self.modules["d"]

    def distill_step(self, batch: torch.Tensor, labels: torch.Tensor | None,
                     gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.job["distill"]
        z = self._z(len(batch), gen)
        with torch.no_grad():
            target = self.teacher["g"](z)
        fake = self.modules["g"](z)
        regress = regression_loss(fake, target, cfg["loss"])
        losses = {"regress": regress}
        if cfg["adversarial_weight"]:
            losses["adversarial"] = generator_loss(self.critic(fake), self.cfg["loss"])
        loss = regress + cfg["adversarial_weight"] * losses.get("adversarial", 0.0)
        self.optimize(loss, "g")
        return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}

    def teacher_generate(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.generate(n, None, gen, g=self.teacher["g"])

    def generate(self, n: int, sample_cfg: dict[str, Any] | None, gen: torch.Generator,
                 progress: Callable[[int, int], None] | None = None,
                 g: torch.nn.Module | None = None) -> torch.Tensor:
        """Images from generator `g` (default: this worker's EMA generator)."""
        g = g or self.sampling_module("g")
        was_training = g.training
        g.eval()
        try:
            return g(self._z(n, gen))
        finally:
            g.train(was_training)
