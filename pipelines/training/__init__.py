"""Training the project's models (the landmark ControlNet first) on diffusers and accelerate."""
