"""The study's head as the notebook built it: Dense(128) -> Dropout(0.3) -> softmax.

Its shape, apart from the Keras code (`keras_head`), so that the registry counts its parameters, and
sizes the MLP head like it, without importing scikit-learn or Keras.
"""

HIDDEN_UNITS = 128
DROPOUT = 0.3
