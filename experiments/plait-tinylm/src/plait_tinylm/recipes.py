from plait.config import JobConfig, ModelSection, TrainingSection


def tinylm_debug() -> JobConfig:
    return JobConfig(
        model=ModelSection(name="tinylm", flavor="debugmodel"),
        training=TrainingSection(steps=20, seq_len=64, local_batch_size=4),
    )
