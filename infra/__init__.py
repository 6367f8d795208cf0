"""Infrastructure around the pipeline: loopback services, work-pool job templates, DeepSpeed configs."""
