"""Clara's ModelSelectionHandler for flcore: keep the best global model.

Being built: see the project's issues."""
