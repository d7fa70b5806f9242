"""genrec.train"""
