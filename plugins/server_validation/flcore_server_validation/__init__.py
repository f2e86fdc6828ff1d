"""Clara's ServerValidationHandler for flcore: score the global model on the server.

Being built: see the project's issues."""
