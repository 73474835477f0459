from dfsfs.cli import main

main()
