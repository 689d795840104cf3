from mosaicd.main import main

main()
