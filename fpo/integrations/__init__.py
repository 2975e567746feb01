"""FPO inside other trainers (optional dependencies): `fpo.integrations.trl` for TRL's DPOTrainer."""
