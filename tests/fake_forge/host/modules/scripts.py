"""Mirror of modules/scripts.py: the base class of a script and the AlwaysVisible marker."""


# modules/scripts.py: AlwaysVisible = object()
class AlwaysVisible:
    pass


# modules/scripts.py: class Script (only what a script subclass relies on at import)
class Script:
    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True
