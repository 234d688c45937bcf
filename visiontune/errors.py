"""The one exception type for a user's mistake: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a path, a file, an argument). Never a bug of ours."""

    exit_code = 2

    def __init__(self, message: str = ""):
        # Raised in a DataLoader worker, it comes back as "Caught UserError in DataLoader worker ... Original
        # Traceback ... UserError: <message>": keep the message, the user's one line.
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)
