from dfsfs.programs import main

main()
