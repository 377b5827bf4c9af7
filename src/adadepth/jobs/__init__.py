"""Training jobs, one module per command: an objective for the training loop and the job
function that builds the model, trains it, measures it and writes its run folder."""
