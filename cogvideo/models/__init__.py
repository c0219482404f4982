"""Model families beyond CogVideo, one package each (`cogvideo/models/<family>/`), registered
with `cogvideo.family` when that module is imported."""
