from visincontext.testing import *  # noqa: F401,F403  (tests import the shared tiny fixtures from here)
from visincontext.testing import EOC_ID, IMAGE_ID, IMAGE_SIZE, VOCAB  # noqa: F401
