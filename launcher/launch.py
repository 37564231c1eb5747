def main(argv=None):
    raise NotImplementedError("launcher under construction")
