"""Launch files for real clusters (SLURM, DeepSpeed, Ray) and the `cogvideo-plan` capacity planner."""
