from minimind_scale.cli import main

if __name__ == "__main__":
    main()
