"""Teacher regeneration (self-distillation data): prompts, the resumable batched job."""
