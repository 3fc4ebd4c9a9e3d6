"""`python -m latentdiff.serve`: AUTOMATIC1111's HTTP API and a web page, one worker thread on the device."""
