"""The preference losses live in fpo_kernels.losses (torch only, for other trainers too); re-exported here."""
from fpo_kernels.losses import LOSSES, dpo_loss, fpo_loss, preference_loss, simpo_loss, tdpo_loss

__all__ = ["dpo_loss", "simpo_loss", "tdpo_loss", "fpo_loss", "preference_loss", "LOSSES"]
