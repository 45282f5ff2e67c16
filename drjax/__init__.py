"""drjax: diabetic-retinopathy grading and Grad-CAM interpretation in JAX.

Submodules are imported explicitly (`import drjax.gradcam`, `from drjax import models`)
so that `import drjax` stays cheap.
"""

__version__ = "0.1.0"
