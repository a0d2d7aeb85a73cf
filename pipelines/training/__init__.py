"""Training the project's models on diffusers and accelerate: one loop (:mod:`.loop`) that every trainer
uses with a small task (:class:`.loop.TrainingTask`), shared data helpers (:mod:`.data`), and the trainers
(the landmark ControlNet first: :mod:`.controlnet`)."""
