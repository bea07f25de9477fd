"""The one error type the detection core raises for bad input, so callers can tell it from a bug."""


class InputError(ValueError):
    """An image or batch the detector cannot accept; the message names the problem."""


class ImageTooLargeError(InputError):
    """An image whose decode or pixels would cost more than the stated bound (an HTTP route answers 413)."""
