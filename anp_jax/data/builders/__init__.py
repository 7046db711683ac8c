"""TFDS builders of the project (registered with TFDS on import).

Each builds its data set from files already on the machine, never from the network:

* :class:`Digits` (``digits``): scikit-learn's bundled 8x8 handwritten digits;
* :class:`FashionMnistIdx` (``fashion_mnist``): the four original IDX files of
  Fashion-MNIST, from Debian's ``dataset-fashion-mnist`` package or
  ``<data_dir>/downloads/manual/``.

A builder that cannot find or trust its source files raises :class:`SourceFilesError` with
one line that says which file and how to get it.
"""

from anp_jax.data.builders.digits import Digits
from anp_jax.data.builders.fashion_mnist import FashionMnistIdx, SourceFilesError

# ``DatasetSpec.tfds_name`` of each of the registry's embedded sets -> its builder class.
BUILDERS = {"digits": Digits, "fashion_mnist_idx": FashionMnistIdx}

__all__ = ["BUILDERS", "Digits", "FashionMnistIdx", "SourceFilesError"]
